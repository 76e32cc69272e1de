"""The notebook API: load a finished (or running) run, plot it, and use its checkpoints.

`load_run` -> metrics as a pandas DataFrame; `plot_losses` / `plot_lr` / `plot_tasks` -> matplotlib Figures;
`load_model`, `generate`, `perplexity` and `bits_per_byte` (from `accel_gpt.inference`) work from checkpoints with
no pickle and no network.
Training from Python is `accel_gpt.train.train(TrainConfig(...))`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from accel_gpt.checkpoint import list_checkpoints
from accel_gpt.errors import UserError
from accel_gpt.inference import (
    bits_per_byte,
    generate,
    load_model,
    open_checkpoint,
    perplexity,
    read_run_config,
    run_checkpoint_dir,
)

if TYPE_CHECKING:  # pandas is imported where it is used: `import accel_gpt.analysis` stays light
    import pandas


@dataclass
class Run:
    path: Path
    config: dict  # the resolved config.yaml the run wrote
    metrics: pandas.DataFrame  # one row per optimizer step, columns = metrics.jsonl fields
    samples: pandas.DataFrame | None = None  # the greedy sample of each evaluation (samples.jsonl): step, text

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint_dir(self) -> Path:
        """Where this run's checkpoints are, wherever the run directory has been moved since."""
        return run_checkpoint_dir(self.path, self.config)

    @property
    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first."""
        return [path for _, path in list_checkpoints(self.checkpoint_dir)]


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory: its config, metrics and samples. A resumed run logs again from its checkpoint's step:
    what was logged from there on before belongs to the abandoned attempt, and only the resumed run's records are
    kept."""
    import pandas as pd

    path = Path(run_dir)
    if not (path / "metrics.jsonl").exists():
        raise UserError(f"{path} is not a run directory (no metrics.jsonl)")
    metrics = step_records(path / "metrics.jsonl")
    # A sample comes after its step's record: one beyond the last step logged is an abandoned attempt's, which the
    # resumed run stopped before sampling again.
    last = metrics[-1]["step"] if metrics else 0
    samples = [record for record in step_records(path / "samples.jsonl") if record["step"] <= last]
    return Run(path, read_run_config(path), pd.DataFrame(metrics), pd.DataFrame(samples, columns=["step", "text"]))


def step_records(path: Path) -> list[dict]:
    """The records of a file of one JSON object per step (metrics.jsonl, samples.jsonl) as the run that finished
    logged them: each attempt logs steps in increasing order, so a record at or before the step of the one before
    it starts a resumed attempt, and the abandoned attempt's records from that step on are dropped. A line torn by
    a kill is skipped with a warning. No file: no records."""
    if not path.exists():
        return []
    records: dict[int, dict] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:  # a run killed mid-write tears its last line; the records around it still count
                warnings.warn(
                    f"{path} line {number} is not a whole record (a run killed while writing it?): skipped",
                    stacklevel=3,
                )
                continue
            while records and next(reversed(records)) >= record["step"]:
                records.popitem()
            records[record["step"]] = record
    return list(records.values())


def _logged(run: Run) -> pandas.DataFrame:
    if run.metrics.empty:  # a run's first records come a few steps in (every 10 on a GPU), or never if it failed
        raise UserError(f"run {run.name} has no logged steps yet: nothing to plot")
    return run.metrics


def _figure():
    try:
        import matplotlib.pyplot as plt  # picks a headless backend by itself where there is no display
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'accel_gpt[analysis]'") from None
    return plt


def plot_losses(
    runs: Run | list[Run], x: str = "step", path: str | Path | None = None, labels: list[str] | None = None
):
    """Training loss per step (faint), evaluation train/val loss (lines), tokens seen on a secondary axis.

    Several runs share one figure (val loss per run), e.g. to compare scaling runs. Returns the Figure and saves
    a PNG when `path` is given."""
    if x not in ("step", "tokens_seen"):
        raise UserError(f"x must be 'step' or 'tokens_seen', got {x!r}")
    plt = _figure()
    runs = [runs] if isinstance(runs, Run) else list(runs)
    frames = [_logged(run) for run in runs]  # before a figure is opened that the error would leave behind
    labels = labels or [run.name for run in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, label in zip(frames, labels):
        # A run that never evaluated (eval_freq 0, or not yet) has no loss columns: it gets no eval points.
        evals = m.reindex(columns=[x, "train_loss", "val_loss"]).dropna(subset=["val_loss"])
        if len(runs) == 1:
            ax.plot(m[x], m["loss"], color="tab:blue", alpha=0.25, linewidth=1, label="training loss (step)")
            ax.plot(evals[x], evals["train_loss"], "o-", color="tab:blue", label="train loss (eval)")
            ax.plot(evals[x], evals["val_loss"], "o-", color="tab:orange", label="val loss (eval)")
        else:
            ax.plot(evals[x], evals["val_loss"], "o-", label=f"{label} val")
    ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if x == "step" and len(runs) == 1 and len(runs[0].metrics) > 1:
        # Tokens seen on a second x axis, as in the classic from-scratch training plot.
        m = runs[0].metrics
        per_step = (m["tokens_seen"].iloc[-1] - m["tokens_seen"].iloc[0]) / max(
            1, m["step"].iloc[-1] - m["step"].iloc[0]
        )
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    ax.set_title(runs[0].name if len(runs) == 1 else "validation loss")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_tasks(runs: Run | list[Run], path: str | Path | None = None, labels: list[str] | None = None):
    """Task scores at each evaluation (`--eval_tasks`): every task's acc and acc_norm (or acc alone for a completion
    task) against the step, several runs in one figure. Returns the Figure and saves a PNG when `path` is given."""
    plt = _figure()
    runs = [runs] if isinstance(runs, Run) else list(runs)
    frames = [_logged(run) for run in runs]
    columns = sorted({c for m in frames for c in m.columns if c.endswith(("/acc", "/acc_norm"))})
    if not columns:
        raise UserError("no task scores to plot: train with --eval_tasks to log them")
    labels = labels or [run.name for run in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, label in zip(frames, labels):
        for column in columns:
            if column in m:
                points = m[["step", column]].dropna()
                ax.plot(points["step"], points[column], "o-", label=column if len(runs) == 1 else f"{label} {column}")
    ax.set(xlabel="optimizer step", ylabel="accuracy", title=runs[0].name if len(runs) == 1 else "task accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_lr(run: Run, path: str | Path | None = None):
    """The learning rate at every step: warmup, then cosine decay."""
    m = _logged(run)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(m["step"], m["lr"])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=f"{run.name}: learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def __getattr__(name: str):  # names of earlier releases (accel_gpt/compat.py)
    from accel_gpt.compat import old_name

    return old_name(__name__, name)


__all__ = [
    "Run",
    "bits_per_byte",
    "generate",
    "load_model",
    "load_run",
    "open_checkpoint",
    "perplexity",
    "plot_losses",
    "plot_lr",
    "plot_tasks",
]
