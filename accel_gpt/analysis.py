"""The notebook API: load a finished (or running) run, plot it, and use its checkpoints.

`load_run` -> metrics as a pandas DataFrame; `plot_losses` / `plot_lr` -> matplotlib Figures; `load_model`,
`generate` and `perplexity` work from checkpoints with no pickle and no network.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from accel_gpt.checkpoint import (
    CONFIG_FILE,
    MANIFEST,
    MODEL_FILE,
    find_checkpoint,
    list_checkpoints,
    load_model_weights,
    verify_checkpoint,
)
from accel_gpt.errors import UserError
from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.model import generate as generate_ids
from accel_gpt.tokenizer import get_tokenizer
from accel_gpt.train import train  # noqa: F401  (re-exported: `from accel_gpt.analysis import train`)


@dataclass
class Run:
    path: Path
    config: dict  # the resolved config.yaml the run wrote
    metrics: "pandas.DataFrame"  # noqa: F821  one row per optimizer step, columns = metrics.jsonl fields

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint_dir(self) -> Path:
        """Where this run's checkpoints are, wherever the run directory has been moved since."""
        saved, output_dir = self.config.get("checkpoint_dir"), self.config.get("output_dir")
        if not saved or not output_dir or Path(saved) == Path(output_dir) / "checkpoints":
            return self.path / "checkpoints"
        if Path(saved).is_absolute():
            return Path(saved)
        launch_dir = self.path  # a relative path was relative to where training ran: <there>/<output_dir>
        for _ in Path(output_dir).parts:
            launch_dir = launch_dir.parent
        return launch_dir / saved

    @property
    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first."""
        return [path for _, path in list_checkpoints(self.checkpoint_dir)]


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. A resumed run logged some steps twice; the latest record of each step wins."""
    import pandas as pd

    path = Path(run_dir)
    if not (path / "metrics.jsonl").exists():
        raise UserError(f"{path} is not a run directory (no metrics.jsonl)")
    records: dict[int, dict] = {}
    for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["step"]] = record
    metrics = pd.DataFrame([records[s] for s in sorted(records)])
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    return Run(path=path, config=config, metrics=metrics)


def _figure():
    try:
        import matplotlib.pyplot as plt  # picks a headless backend by itself where there is no display
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'accel_gpt[analysis]'") from None
    return plt


def plot_losses(runs: Run | list[Run], x: str = "step", path: str | Path | None = None, labels: list[str] | None = None):
    """Training loss per step (faint), evaluation train/val loss (lines), tokens seen on a secondary axis.

    Several runs share one figure (val loss per run), e.g. to compare scaling runs. Returns the Figure and saves
    a PNG when `path` is given."""
    if x not in ("step", "tokens_seen"):
        raise UserError(f"x must be 'step' or 'tokens_seen', got {x!r}")
    plt = _figure()
    runs = [runs] if isinstance(runs, Run) else list(runs)
    labels = labels or [run.name for run in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, label in zip(runs, labels):
        m = run.metrics
        evals = m[m["val_loss"].notna()] if "val_loss" in m else m.iloc[0:0]
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
        per_step = (m["tokens_seen"].iloc[-1] - m["tokens_seen"].iloc[0]) / max(1, m["step"].iloc[-1] - m["step"].iloc[0])
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    ax.set_title(runs[0].name if len(runs) == 1 else "validation loss")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_lr(run: Run, path: str | Path | None = None):
    """The learning rate at every step: warmup, then cosine decay."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(run.metrics["step"], run.metrics["lr"])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=f"{run.name}: learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _checkpoint_path(path: Path, step: int | None) -> Path:
    if (path / MANIFEST).exists():  # one checkpoint directory
        if step is not None:
            raise UserError("step selects a checkpoint of a run directory; this is already one checkpoint")
        verify_checkpoint(path)
        return path
    checkpoint_dir = load_run(path).checkpoint_dir if (path / "metrics.jsonl").exists() else path / "checkpoints"
    return find_checkpoint(checkpoint_dir, "latest" if step is None else str(step))


def load_model(path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> GPTModel:
    """The GPTModel of a checkpoint, in eval mode on `device`. `path` is a run directory (its newest complete
    checkpoint, or the one at `step`) or a checkpoint directory. Reads safetensors and JSON only."""
    checkpoint = _checkpoint_path(Path(path), step)
    config = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
    model = GPTModel(GPTConfig(**config))
    load_model_weights(model, checkpoint / MODEL_FILE)
    return model.to(device).eval()


def generate(
    model: GPTModel,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    tokenizer: str = "gpt2",
) -> str:
    """The prompt plus its continuation: greedy at temperature 0, else sampled (reproducibly with `seed`)."""
    enc = get_tokenizer(tokenizer)
    device = next(model.parameters()).device
    idx = torch.tensor([enc.encode(prompt, allowed_special="all")], device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    out = generate_ids(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return enc.decode(out[0].tolist())


@torch.no_grad()
def perplexity(model: GPTModel, text_or_path: str | Path, stride: int | None = None, tokenizer: str = "gpt2") -> float:
    """exp(mean next-token loss) over a text (or a file's text), scored with sliding windows of the model's
    context: each token is scored once, with up to `context_len - stride` tokens of context before it."""
    looks_like_path = isinstance(text_or_path, Path) or ("\n" not in text_or_path and len(text_or_path) < 1024)
    is_file = looks_like_path and os.path.isfile(text_or_path)
    text = Path(text_or_path).read_text(encoding="utf-8") if is_file else str(text_or_path)
    ids = torch.tensor(get_tokenizer(tokenizer).encode_ordinary(text))
    if len(ids) < 2:
        raise UserError("perplexity needs at least two tokens of text")
    context = model.config.context_len
    stride = stride or context // 2
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, scored, start = 0.0, 0, 0  # targets 1..scored have been scored
    while scored < len(ids) - 1:
        end = min(start + context + 1, len(ids))
        window = ids[start:end].to(device)
        losses = F.cross_entropy(model(window[None, :-1])[0].float(), window[1:], reduction="none")
        new = end - 1 - scored  # this window's targets that earlier windows did not score
        total_loss += losses[-new:].sum().item()
        scored += new
        start += stride
    model.train(was_training)
    return math.exp(total_loss / scored)
