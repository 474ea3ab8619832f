"""Training checkpoints: atomic, self-contained, resumable.

Layout: `RUN/checkpoints/step_{step:08d}/` holding `model.safetensors` (the draft, without the frozen
`embed_tokens.weight`, which the trainer reloads from the target), `optimizer.pt`, `scheduler.pt`,
`rng.pt` (python, numpy, torch cpu and cuda generators), `trainer_state.json` (step, epoch, micro,
reason), `config.json` (the draft config) and a `COMPLETE` marker.

A checkpoint is written into a hidden temp dir beside its final place, every file fsynced, the
marker written last, and only then renamed into place: a crash (or a SIGKILL from the GUI) leaves
either the previous checkpoints or the new one, never half of one. `latest_checkpoint` only trusts
`step_*` dirs that hold the marker, so a torn copy made by other tools is ignored too. Old
checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fsutil import staged_dir
from ..models.checkpoints import (CHECKPOINTS, COMPLETE, MODEL_FILE, STEP_RE, complete_checkpoints,  # noqa: F401
                                  latest_checkpoint, resolve_checkpoint, step_dir_name)

# The frozen target embedding is large (vocab x H) and identical to the target's: not worth saving.
DROP_KEYS = ("embed_tokens.weight",)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _tensors_for_safetensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliasing tensors, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state.items():
        if k in DROP_KEYS:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"model_state[{k!r}] is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def _rng_state() -> dict:
    # numpy's state is stored as plain lists so that torch.load(weights_only=True) can read it back.
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(rng: dict) -> None:
    """Put the python / numpy / torch (and cuda, when both sides have it) generators back."""
    if not rng:
        return
    if "python" in rng:
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in rng:
        torch.set_rng_state(torch.as_tensor(rng["torch"], dtype=torch.uint8).cpu())
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        n = min(len(states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(states[i].cpu(), i)


def save_checkpoint(run_dir, step: int, model_state: dict, opt, sched, extra: dict, config: dict,
                    keep_last: int, is_main: bool, subdir: str = CHECKPOINTS) -> Path | None:
    """Write `run_dir/<subdir>/step_{step:08d}` atomically; keep the newest `keep_last` there.

    Non-main ranks do nothing (the model is replicated; rank 0's copy is the checkpoint)."""
    if not is_main:
        return None
    from safetensors.torch import save_file

    root = Path(run_dir) / subdir
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    # Same step saved again (a cancel checkpoint, then the final one after resume) replaces it whole.
    with staged_dir(final) as tmp:
        files = []
        save_file(_tensors_for_safetensors(model_state), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        files.append(tmp / MODEL_FILE)
        if opt is not None:
            # A dict is an optimizer state already gathered (a sharded draft's, see distributed.DraftEngine).
            torch.save(opt if isinstance(opt, dict) else opt.state_dict(), tmp / "optimizer.pt")
            files.append(tmp / "optimizer.pt")
        if sched is not None:
            torch.save(sched.state_dict(), tmp / "scheduler.pt")
            files.append(tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        files.append(tmp / "rng.pt")
        state = {"step": int(step), **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2, default=str), encoding="utf-8")
        files += [tmp / "trainer_state.json", tmp / "config.json"]
        for f in files:
            _fsync_file(f)
        (tmp / COMPLETE).write_text(f"step {int(step)}\n", encoding="utf-8")
        _fsync_file(tmp / COMPLETE)
        _fsync_dir(tmp)
    _fsync_dir(root)
    _prune(root, keep_last, keep=final)
    return final


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    complete = complete_checkpoints(root)
    doomed = [d for _, d in complete[:-max(1, int(keep_last))] if d != keep]
    newest = complete[-1][0] if complete else -1
    for d in root.iterdir():
        # Leftovers of crashed saves (temp dirs, step dirs without the marker) are garbage.
        if d.name.startswith((".tmp_", ".old_")) and d.is_dir():
            doomed.append(d)
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and not (d / COMPLETE).exists() and int(m.group(1)) <= newest:
            doomed.append(d)
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file becomes one message naming it
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def load_checkpoint(path) -> dict:
    """Everything a resume needs: model/optimizer/scheduler state, rng, trainer state, draft config."""
    from safetensors.torch import load_file

    ck = resolve_checkpoint(path)
    out: dict[str, Any] = {"path": ck}
    try:
        out["model_state"] = load_file(str(ck / MODEL_FILE))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{ck / MODEL_FILE}: cannot read ({type(e).__name__}: {e})") from None
    out["optimizer_state"] = _torch_load(ck / "optimizer.pt") if (ck / "optimizer.pt").exists() else None
    out["scheduler_state"] = _torch_load(ck / "scheduler.pt") if (ck / "scheduler.pt").exists() else None
    out["rng"] = _torch_load(ck / "rng.pt") if (ck / "rng.pt").exists() else {}
    for key, name in (("trainer_state", "trainer_state.json"), ("config", "config.json")):
        f = ck / name
        try:
            out[key] = json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: corrupt JSON: {e}") from None
    return out
