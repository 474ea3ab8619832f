"""What the workbench may expose and touch: the bind policy and the workspace path jail.

The workbench can read files and (later) start jobs that write to disk, so it must not be served
to a network by accident. `check_bind_policy` refuses a non-loopback host (or a public `--share`
link) unless the user gave `--auth user:pass` or explicitly accepted the risk with
`--allow-unauthenticated-remote`. `resolve_in_workspace` is the only way a path typed into the GUI
becomes a file path: it refuses anything that lands outside the workspace root, whether by an
absolute path, `..` or a symlink that points out.
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class SecurityError(ValueError):
    """A launch or a path that the policy refuses; the message says why and what to do instead."""


class PathOutsideWorkspace(SecurityError):
    """A user-supplied path that resolves outside the workspace root."""


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        # Any other host name may resolve to a public interface: treat it as remote.
        return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """`user:pass` -> (user, pass). The password may itself contain ':'; neither part may be empty."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise SecurityError("--auth must look like user:password (both non-empty)")
    return user, password


def check_bind_policy(host: str, auth: str | None = None, allow_unauthenticated_remote: bool = False,
                      share: bool = False) -> tuple[str, str] | None:
    """Validate how the workbench is about to be served; return the parsed credentials (or None).

    Raises `SecurityError` with a message meant for the terminal when the launch would expose the
    file system and job controls to a network without a password.
    """
    creds = parse_auth(auth)
    if creds is not None or allow_unauthenticated_remote:
        return creds
    if share:
        raise SecurityError(
            "--share publishes the workbench on a public gradio.live link, which gives anyone with the "
            "link access to your workspace files and jobs. Add --auth user:password, or pass "
            "--allow-unauthenticated-remote if you really mean it.")
    if not is_loopback(host):
        raise SecurityError(
            f"--host {host} makes the workbench reachable from other machines, and it can read files "
            "and start jobs in the workspace. Add --auth user:password, or pass "
            "--allow-unauthenticated-remote if the network is trusted (or keep the default "
            "--host 127.0.0.1).")
    return None


def resolve_in_workspace(root: str | os.PathLike, user_path: str | os.PathLike) -> Path:
    """Turn a path typed by a user into an absolute path that is guaranteed to lie inside `root`.

    Relative paths are taken relative to `root`; absolute ones are accepted only if they are inside
    it. Symlinks are resolved first, so a link inside the workspace that points outside is refused.
    The path need not exist (a later read reports that with its own message).
    """
    if user_path is None or not str(user_path).strip():
        raise PathOutsideWorkspace("no path given")
    raw = str(user_path).strip()
    if "\x00" in raw:
        raise PathOutsideWorkspace(f"{raw!r}: invalid path")
    root_resolved = Path(root).expanduser().resolve()
    p = Path(raw).expanduser()
    candidate = p if p.is_absolute() else root_resolved / p
    # strict=False: a not-yet-existing file still resolves its existing parents' symlinks.
    resolved = candidate.resolve(strict=False)
    if resolved != root_resolved and not resolved.is_relative_to(root_resolved):
        raise PathOutsideWorkspace(
            f"{raw}: outside the workspace ({root_resolved}); only files under the workspace can be opened here")
    return resolved


def resolve_path_fields(root: str | os.PathLike, data: dict, fields: Iterable[str]) -> tuple[dict, dict[str, str]]:
    """A copy of `data` whose path fields (a path or a list of paths) are resolved inside the
    workspace, and the fields refused, by name."""
    out, errors = dict(data), {}
    for name in fields:
        v = out.get(name)
        if v is None:
            continue
        try:
            out[name] = [str(resolve_in_workspace(root, x)) for x in v] if isinstance(v, list) \
                else str(resolve_in_workspace(root, v))
        except PathOutsideWorkspace as e:
            errors[name] = str(e)
    return out, errors


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str, max_len: int = 120) -> str:
    """A file name from elsewhere (an upload) -> a plain base name safe to create in a workspace folder:
    folders dropped (both separators), characters outside `A-Z a-z 0-9 . _ -` replaced by `_`, no leading
    dot or dash (no hidden files, no flags), at most `max_len` characters with the extension kept.
    Raises `SecurityError` when nothing usable is left."""
    base = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = _UNSAFE_CHARS.sub("_", base).lstrip(".-_")
    if len(base) > max_len:
        stem, dot, ext = base.rpartition(".")
        ext = ext[-20:]
        base = stem[: max_len - len(ext) - 1] + dot + ext
    if not base or set(base) <= {".", "_"}:
        raise SecurityError(f"{name!r}: not a usable file name")
    return base
