"""Where a dataset preset's rows come from: a local copy, the Hugging Face cache, or the hub.

`iter_source_records(preset, source_path)` yields `(file, line, record)` for `readers.normalize_records`:
from `source_path` (a file or a directory of JSON / JSONL / Parquet, read by our streaming readers, so
one bad row is skipped and reported rather than aborting, as `datasets`' JSON builder would; or a
`save_to_disk` directory, through `datasets`), or else from the hub id through the local Hugging Face
cache with `datasets.load_dataset(..., streaming=True)`. When the source is neither local nor cached
and the hub cannot be reached, it fails at once with a message that says to pass `--source-path`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from .presets import Preset
from .readers import DEFAULT_MAX_ROW_BYTES, expand_paths, iter_records


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
class SourceUnavailable(FileNotFoundError):
    """A preset's data is neither local nor in the Hugging Face cache, and the hub cannot be reached."""


def _hf_cache_dirs(hub_id: str) -> list[Path]:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub")))
    ds_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    org_name = hub_id.replace("/", "--")
    return [hub_cache / f"datasets--{org_name}", ds_cache / hub_id.replace("/", "___")]


def is_cached(preset: Preset) -> bool:
    return any(d.exists() for d in _hf_cache_dirs(preset.hub_id))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(preset: Preset, why: str) -> SourceUnavailable:
    return SourceUnavailable(
        f"dataset preset {preset.name!r}: {preset.hub_id} (split {preset.split}) is not available: {why}. "
        f"Download it where the hub is reachable (e.g. `huggingface-cli download --repo-type dataset "
        f"{preset.hub_id} --local-dir DIR`) and pass --source-path DIR (a file or a directory of "
        f"JSON / JSONL / Parquet files).")


def iter_source_records(preset: Preset, source_path: Optional[str] = None,
                        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[str, int, Any]]:
    """`(file, line, record)` for a preset's source rows (see the module docstring). Raises
    FileNotFoundError / SourceUnavailable before yielding when the source cannot be opened."""
    if source_path:
        p = Path(source_path)
        if p.is_dir() and (p / "dataset_info.json").exists() and (p / "state.json").exists():
            return _iter_saved_dataset(p, preset)
        files = expand_paths([p])
        return ((str(f), line, obj) for f in files for line, obj in iter_records(f, max_row_bytes))
    cached = is_cached(preset)
    if not cached and not _hub_reachable():
        raise _unavailable(preset, "it is not in the local Hugging Face cache "
                           f"({', '.join(str(d) for d in _hf_cache_dirs(preset.hub_id))}) and the hub "
                           "cannot be reached")
    return _iter_hub(preset, offline=cached and not _hub_reachable(timeout=1.0))


def _iter_saved_dataset(path: Path, preset: Preset) -> Iterator[tuple[str, int, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = preset.split if preset.split in ds else next(iter(ds))
        ds = ds[split]
    for i, rec in enumerate(ds, 1):
        yield str(path), i, rec


def _iter_hub(preset: Preset, offline: bool) -> Iterator[tuple[str, int, Any]]:
    if offline:
        # datasets reads these at import; set them for a first import and patch a module already loaded.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    if offline:
        datasets.config.HF_HUB_OFFLINE = True
        try:
            import huggingface_hub.constants as hc

            hc.HF_HUB_OFFLINE = True
        except Exception:  # noqa: BLE001 - only a hint to huggingface_hub
            pass
    try:
        ds = datasets.load_dataset(preset.hub_id, preset.hub_config, split=preset.split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # noqa: BLE001 - any failure to open the source gets the same advice
        raise _unavailable(preset, f"loading it with `datasets` failed ({type(e).__name__}: {e})") from None
    if first is None:
        return
    label = f"hf://{preset.hub_id}/{preset.split}"
    yield label, 1, first
    for i, rec in enumerate(it, 2):
        yield label, i, rec
