"""Training metrics to ``workdir/metrics.jsonl`` (one JSON object per logged step) and to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import jax


class MetricsWriter:
    """Appends ``{"step": ..., "loss": ..., ...}`` lines; only process 0 writes.

    On resume, lines of steps after the restored checkpoint (written by the
    run that crashed) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if not self.active:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step":
                self._tensorboard.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
