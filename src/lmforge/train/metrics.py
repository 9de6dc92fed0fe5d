"""Metrics to JSONL (always) and TensorBoard (when installed): one record per log step."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def _kept_records(path: Path, resume_step: int) -> list[str]:
    """The lines of ``path`` up to ``resume_step``. A killed run may have logged steps after its last checkpoint
    (they are re-run, so they go) and may have been killed mid-write: a line that is not a JSON record (the torn
    last one) is dropped with a warning instead of blocking the resume."""
    kept, torn = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn.append(n)
            continue
        if not isinstance(record, dict):
            torn.append(n)
        elif record.get("step", 0) <= resume_step:
            kept.append(line)
    if torn:
        warnings.warn(f"{path}: dropped {len(torn)} unreadable line(s) ({', '.join(map(str, torn[:5]))}), "
                      "e.g. one torn by a kill mid-write", stacklevel=3)
    return kept


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = _kept_records(self.path, resume_step)
            tmp = self.path.with_name(self.path.name + ".tmp")  # rewritten whole: a kill now loses nothing
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        elif resume_step is None:
            self.path.write_text("")
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
