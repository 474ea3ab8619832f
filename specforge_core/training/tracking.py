"""Experiment tracking: `metrics.jsonl` in the run directory always; wandb and TensorBoard when asked.

The GUI and notebooks read `metrics.jsonl` (one JSON object per logged step, `split` = train or
eval), so it is written on rank 0 whatever else is configured, and appended line by line so a
killed run keeps every row it logged. A resumed run first drops rows past the checkpoint it resumes
from, so the file reads as one uninterrupted curve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(self, run_dir: str | Path, report_to: list[str], config: dict, is_main: bool = True,
                 wandb_project: str = "specforge-wb", wandb_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("--report-to wandb needs the `wandb` package (pip install wandb)") from e
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config,
                                     dir=str(self.run_dir), resume="allow")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("--report-to tensorboard needs the `tensorboard` package") from e
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop metric rows logged after `step` (they belong to work a resume will redo)."""
        if not self.is_main or not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill
                if rec.get("step", 0) <= step:
                    keep.append(json.dumps(rec, ensure_ascii=False))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        line = json.dumps(row, ensure_ascii=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        step = row.get("step", 0)
        split = row.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step",)}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
