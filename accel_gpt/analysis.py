"""The notebook API: load a finished (or running) run, plot it, and use its checkpoints.

`load_run` -> metrics as a pandas DataFrame; `plot_losses` / `plot_lr` -> matplotlib Figures; `load_model`,
`generate` and `perplexity` work from checkpoints with no pickle and no network (the generate and evaluate
command lines are built on them).
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
import yaml

from accel_gpt.cache import DEFAULT_DIR as DEFAULT_CACHE_DIR
from accel_gpt.checkpoint import (
    CONFIG_FILE,
    MANIFEST,
    MODEL_FILE,
    find_checkpoint,
    list_checkpoints,
    load_model_weights,
    verify_checkpoint,
)
from accel_gpt.data import BUNDLED_CORPORA, TokenStream, tokenize_corpus
from accel_gpt.errors import UserError
from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.model import generate as generate_ids
from accel_gpt.tokenizer import get_tokenizer
from accel_gpt.train import train  # noqa: F401  (re-exported: `from accel_gpt.analysis import train`)

if TYPE_CHECKING:  # pandas is imported where it is used: `import accel_gpt.analysis` stays light
    import pandas


@dataclass
class Run:
    path: Path
    config: dict  # the resolved config.yaml the run wrote
    metrics: pandas.DataFrame  # one row per optimizer step, columns = metrics.jsonl fields

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
    """Read a run directory. A resumed run logs again from its checkpoint's step: what was logged from there on
    before belongs to the abandoned attempt, and only the resumed run's records are kept."""
    import pandas as pd

    path = Path(run_dir)
    if not (path / "metrics.jsonl").exists():
        raise UserError(f"{path} is not a run directory (no metrics.jsonl)")
    records: dict[int, dict] = {}  # in step order: each attempt logs steps in increasing order
    lines = (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:  # a run killed mid-write tears its last line; the records around it still count
                warnings.warn(
                    f"{path / 'metrics.jsonl'} line {number} is not a whole record (a run killed while "
                    "writing it?): skipped",
                    stacklevel=2,
                )
                continue
            # Resumed from an earlier checkpoint and stopped sooner, a run must not show the old attempt's tail.
            while records and next(reversed(records)) >= record["step"]:
                records.popitem()
            records[record["step"]] = record
    metrics = pd.DataFrame(list(records.values()))
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    return Run(path=path, config=config, metrics=metrics)


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


def _checkpoint_path(path: Path, step: int | None) -> Path:
    if (path / MANIFEST).exists():  # one checkpoint directory
        if step is not None:
            raise UserError("step selects a checkpoint of a run directory; this is already one checkpoint")
        verify_checkpoint(path)
        return path
    if (path / "metrics.jsonl").exists():
        checkpoint_dir = load_run(path).checkpoint_dir
    elif list_checkpoints(path):  # the folder that holds them, as --checkpoint_dir named it
        checkpoint_dir = path
    else:
        checkpoint_dir = path / "checkpoints"
    return find_checkpoint(checkpoint_dir, "latest" if step is None else str(step))


def resolve_device(name: str | None) -> torch.device:
    """A device name from the command line (None: cuda when available, else cpu), checked before use."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UserError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this torch sees no CUDA GPU")
    return device


class Checkpoint(NamedTuple):
    model: GPTModel  # in eval mode
    train_config: dict  # the training config saved with it: tokenizer, special_token_id, ...
    path: Path  # the checkpoint directory


def open_checkpoint(path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> Checkpoint:
    """`load_model`, plus the training config saved with the checkpoint and the directory it came from."""
    checkpoint = _checkpoint_path(Path(path), step)
    saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    model = GPTModel(GPTConfig(**saved["model"]))
    load_model_weights(model, checkpoint / MODEL_FILE)
    return Checkpoint(model.to(device).eval(), saved.get("train", {}), checkpoint)


def load_model(path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> GPTModel:
    """The GPTModel of a checkpoint, in eval mode on `device`. `path` is a run directory or the folder holding its
    checkpoints (then its newest complete checkpoint, or the one at `step`), or a checkpoint directory. Reads
    safetensors and JSON only."""
    return open_checkpoint(path, step, device).model


def generate(
    model: GPTModel,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    tokenizer: str = "gpt2",
    top_p: float | None = None,
) -> str:
    """The prompt plus its continuation: greedy at temperature 0, else sampled (reproducibly with `seed`) from
    the top_k most likely tokens and/or the smallest set holding top_p of the probability. An empty prompt
    starts a new document, as the generate command line does."""
    enc = get_tokenizer(tokenizer)
    device = next(model.parameters()).device
    ids = enc.encode(prompt, allowed_special="all")
    idx = torch.tensor([ids or [enc.eot_token]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    out = generate_ids(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    model.train(was_training)
    return enc.decode(out[0, 0 if ids else 1 :].tolist())  # the end-of-text that stood in for no prompt is not text


def is_data_path(text_or_path: str | Path) -> bool:
    """Whether `perplexity` reads `text_or_path` as a data path (a file, directory, glob or bundled corpus name,
    as training takes them) rather than as the text itself."""
    if isinstance(text_or_path, Path):
        return True
    spec = str(text_or_path)
    if "\n" in spec or len(spec) >= 1024:
        return False
    return spec in BUNDLED_CORPORA or os.path.exists(spec) or (any(c in spec for c in "*?[") and bool(glob.glob(spec)))


def corpus_tokens(
    spec: str | Path,
    tokenizer: str = "gpt2",
    special_token_id: int | None = None,
    data_cache_dir: str | Path | None = None,
) -> TokenStream:
    """A data path's tokens exactly as training reads them: end-of-text after each document, cached on disk."""
    eot = get_tokenizer(tokenizer).eot_token if special_token_id is None else special_token_id
    return tokenize_corpus(str(spec), tokenizer, eot, data_cache_dir or DEFAULT_CACHE_DIR)[0]


@torch.no_grad()
def sliding_window_loss(
    model: GPTModel, tokens: torch.Tensor | TokenStream, stride: int, batch_size: int = 4
) -> tuple[float, int]:
    """(mean next-token loss, tokens scored) over `tokens`, with windows of the model's context every `stride`
    tokens: each target is scored once, by the first window that holds it at its end, so every one after the
    first window has at least `context_len - stride` tokens of context. `stride == context_len` scores
    non-overlapping windows. Windows are run `batch_size` at a time; the numbers do not depend on it."""
    context = model.config.context_len
    if not 0 < stride <= context:
        raise UserError(
            f"stride must be between 1 and the model's context_len {context}, got {stride} "
            "(a longer stride would skip tokens)"
        )
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    n = len(tokens)
    if n < 2:
        raise UserError("scoring needs at least two tokens of text")
    read = tokens.read if isinstance(tokens, TokenStream) else lambda a, b: tokens[a:b]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    last = max(0, -(-(n - 1 - context) // stride))  # the first window whose end reaches the last target
    starts = [k * stride for k in range(last + 1)]
    # Only the last window can be shorter than context + 1; it runs in a batch of its own.
    full = starts[:-1] if starts[-1] + context + 1 > n else starts
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    if len(full) < len(starts):
        groups.append(starts[-1:])
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one host sync at the end
    for group in groups:
        windows = torch.stack([torch.as_tensor(read(s, min(s + context + 1, n))) for s in group]).to(device)
        logits = model(windows[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(group), -1)
        for row, start in enumerate(group):
            # Targets up to the previous window's end (start - stride + context) are already scored.
            new = min(start + context, n - 1) - (start - stride + context if start else 0)
            total += losses[row, -new:].sum()
    model.train(was_training)
    return total.item() / (n - 1), n - 1


def perplexity(
    model: GPTModel,
    text_or_path: str | Path,
    stride: int | None = None,
    tokenizer: str = "gpt2",
    batch_size: int = 4,
    data_cache_dir: str | Path | None = None,
) -> float:
    """exp(mean next-token loss) over a text, or over a data path (file, directory, glob, bundled corpus name)
    tokenized as training does it. Sliding windows of the model's context every `stride` tokens (default half
    the context): see `sliding_window_loss`. `python -m accel_gpt.evaluate` prints the same number."""
    if is_data_path(text_or_path):
        tokens = corpus_tokens(text_or_path, tokenizer, data_cache_dir=data_cache_dir)
    else:
        tokens = torch.tensor(get_tokenizer(tokenizer).encode_ordinary(str(text_or_path)))
    stride = model.config.context_len // 2 if stride is None else stride
    return math.exp(sliding_window_loss(model, tokens, stride, batch_size)[0])
