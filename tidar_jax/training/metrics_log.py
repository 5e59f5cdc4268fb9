"""Training metrics sinks: WORKDIR/metrics.jsonl (always) and TensorBoard (only when tensorboardX is installed).

Only process 0 writes. One JSON object per line; keys are metric names, values floats (lists for per-slot
accuracies), plus `step`. A process killed while appending leaves at most an unterminated last line: readers skip
it and the resumed run's `truncate_after` drops it; that rewrite goes through a temporary file and an atomic
rename, so a kill during it leaves the old file whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def to_python(value: Any) -> Any:
    """Scalars -> float, vectors -> list of floats (JSON-friendly)."""
    arr = np.asarray(value)
    return float(arr) if arr.ndim == 0 else [float(v) for v in arr.reshape(-1)]


class MetricsLog:
    """Appends metric records to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard when available."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter  # optional dependency
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None:
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (a resumed run repeats the steps after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(partial, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Records `metrics` at `step`; returns the JSON-ready record."""
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{key}/{i}", v, step)
                else:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of `workdir/metrics.jsonl` in file order (empty list when absent), without an unterminated
    last line (a write cut short by a kill)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]
