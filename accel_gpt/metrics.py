"""What a run reports: `metrics.jsonl` (one JSON object per optimizer step), `samples.jsonl`, and the console.

Only the main process writes; every other rank gets a logger that does nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps a resumed run's history in one file; readers keep the latest record of each step.
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._samples = open(run_dir / "samples.jsonl", "a", encoding="utf-8")
        # The bar only makes sense on a terminal; logs and CI get the plain per-step lines alone.
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", disable=not sys.stderr.isatty())

    def info(self, message: str) -> None:
        if self.enabled:
            self._bar.write(message, file=sys.stdout)
            sys.stdout.flush()

    def log_step(self, record: dict, total_steps: int) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        line = (
            f"step {record['step']:>6}/{total_steps} | epoch {record['epoch']} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_sec']:,.0f} tok/s"
        )
        if "val_loss" in record:
            line += f" | train_loss {record['train_loss']:.4f} | val_loss {record['val_loss']:.4f}"
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        self.info(line)

    def log_sample(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        self._samples.write(json.dumps({"step": step, "text": text}, ensure_ascii=False) + "\n")
        self._samples.flush()
        self.info(f"sample @ step {step}: {text!r}")

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._metrics.close()
            self._samples.close()
