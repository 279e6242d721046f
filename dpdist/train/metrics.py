"""Where rank 0's logged metrics go: ``RUN_DIR/metrics.jsonl`` (one JSON record per log), and with
``train.tensorboard`` the same values at the same step as TensorBoard scalars under
``RUN_DIR/tensorboard/``.  Both are flushed at every log, so a run killed between logs loses nothing
already logged."""
from __future__ import annotations

import json
from pathlib import Path

SCALARS = ("loss", "lr", "epsilon", "clipped_fraction", "tokens_per_s")
TENSORBOARD = "tensorboard"


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")
        self.writer = None
        if tensorboard:
            # imported here: tensorboard is an optional dependency (config validation checks it is there)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in SCALARS:
                self.writer.add_scalar(key, record[key], global_step=record["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
