"""`python -m specforge_core` is the `specforge-wb` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
