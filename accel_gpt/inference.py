"""Checkpoints at work without the trainer: load a model, generate text, score a corpus (loss and perplexity).

Imports no training code (no Accelerate): the sample, evaluate and export commands and the notebook API build on it.
"""

from __future__ import annotations

import glob
import json
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
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
from accel_gpt.data.cache import DEFAULT_DIR as DEFAULT_CACHE_DIR
from accel_gpt.data.sources import BUNDLED_CORPORA, has_wildcards, scored_files
from accel_gpt.data.tokens import TokenStream, tokenize_corpus
from accel_gpt.errors import UserError
from accel_gpt.model import GPTConfig, GPTModel, stream_tokens
from accel_gpt.tokenizer import TOKENIZER_FILE, get_tokenizer, token_byte_lengths


def read_run_config(run_dir: Path) -> dict:
    """The resolved config.yaml a run wrote into its directory ({} if it has none)."""
    config_file = run_dir / "config.yaml"
    return (yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.exists() else None) or {}


def run_checkpoint_dir(run_dir: Path, config: dict) -> Path:
    """Where the checkpoints of the run in `run_dir` are, from its config.yaml, wherever the run directory has
    been moved since."""
    saved, output_dir = config.get("checkpoint_dir"), config.get("output_dir")
    if not saved or not output_dir or Path(saved) == Path(output_dir) / "checkpoints":
        return run_dir / "checkpoints"
    if Path(saved).is_absolute():
        return Path(saved)
    launch_dir = run_dir  # a relative path was relative to where training ran: <there>/<output_dir>
    for _ in Path(output_dir).parts:
        launch_dir = launch_dir.parent
    return launch_dir / saved


def accel_gpt_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint that `path` names if it is one of ours (a checkpoint, a run directory, the folder of a run's
    checkpoints): its newest complete one; None for anything else, such as a Hugging Face folder."""
    path = Path(path)
    if not path.is_dir():
        return None
    ours = (path / MANIFEST).exists() or (path / "metrics.jsonl").exists() or list_checkpoints(path)
    return _checkpoint_path(path, None) if ours or list_checkpoints(path / "checkpoints") else None


def _checkpoint_path(path: Path, step: int | None) -> Path:
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise UserError(f"checkpoint path {path} is a file: pass a run directory or a checkpoint directory")
    if (path / MANIFEST).exists():  # one checkpoint directory
        if step is not None:
            raise UserError("step selects a checkpoint of a run directory; this is already one checkpoint")
        verify_checkpoint(path)
        return path
    if (path / "metrics.jsonl").exists():
        checkpoint_dir = run_checkpoint_dir(path, read_run_config(path))
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
    tokenizer: str = "gpt2"  # what `get_tokenizer` takes for its tokenizer: a name, or the checkpoint that holds it


def open_checkpoint(path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> Checkpoint:
    """`load_model`, plus the training config saved with the checkpoint and the directory it came from."""
    checkpoint = _checkpoint_path(Path(path), step)
    saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    model = GPTModel(GPTConfig(**saved["model"]))
    load_model_weights(model, checkpoint / MODEL_FILE)
    train = saved.get("train", {})
    # A run with a tokenizer folder saves its files in every checkpoint, verified with the weights.
    tokenizer = str(checkpoint) if (checkpoint / TOKENIZER_FILE).is_file() else train.get("tokenizer", "gpt2")
    model.tokenizer_name = tokenizer  # what generate, perplexity and bits_per_byte use unless told otherwise
    if train.get("document_mask"):  # scored as it trained: attention stops at each end-of-text token
        eot = train.get("special_token_id")
        model.document_boundary = get_tokenizer(tokenizer).eot_token if eot is None else eot
    return Checkpoint(model.to(device).eval(), train, checkpoint, tokenizer)


def tokenizer_of(model: GPTModel, tokenizer=None):
    """`tokenizer` if given, else the one `model`'s checkpoint was trained with (`open_checkpoint` notes it on the
    model), else GPT-2's."""
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer_name", "gpt2")


def load_model(path: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> GPTModel:
    """The GPTModel of a checkpoint, in eval mode on `device`. `path` is a run directory or the folder holding its
    checkpoints (then its newest complete checkpoint, or the one at `step`), or a checkpoint directory. Reads
    safetensors and JSON only."""
    return open_checkpoint(path, step, device).model


def encode_prompt(tokenizer: tiktoken.Encoding, prompt: str, eot_id: int | None = None) -> list[int]:
    """A prompt's ids, special tokens allowed; an empty prompt is the end-of-text token alone, so the model starts
    a new document, as GPT-2's unconditional samples do."""
    return tokenizer.encode(prompt, allowed_special="all") or [tokenizer.eot_token if eot_id is None else eot_id]


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None
) -> None:
    """The sampling options' types and ranges, checked alike for `generate` and `python -m accel_gpt.sample`."""
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise UserError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not _is_integer(top_k) or top_k <= 0):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise UserError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if seed is not None and not _is_integer(seed):
        raise UserError(f"seed must be an integer or None, got {seed!r}")


def generate(
    model: GPTModel,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    tokenizer: str | tiktoken.Encoding | None = None,
    top_p: float | None = None,
    until: Callable[[], bool] | None = None,
) -> str:
    """The prompt plus its continuation: greedy at temperature 0, else sampled (reproducibly with `seed`) from
    the top_k most likely tokens and/or the smallest set holding top_p of the probability. An empty prompt
    starts a new document (`encode_prompt`). `until`, asked after each token, ends the text early when it says so
    (the training loop's stop signal: its samples come from here too). `tokenizer`: the model's own
    (`tokenizer_of`) unless given."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    tokenizer = tokenizer_of(model, tokenizer)
    enc = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    device = next(model.parameters()).device
    ids = encode_prompt(enc, prompt)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    new_ids = []
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
    for next_id in stream_tokens(model, torch.tensor([ids], device=device), max_new_tokens, **options):
        new_ids.append(next_id)  # kept on the device: no host sync between tokens
        if until is not None and until():
            break
    model.train(was_training)
    new_ids = torch.cat(new_ids, dim=1)[0].tolist() if new_ids else []
    return enc.decode(ids[0 if prompt else 1 :] + new_ids)  # the end-of-text standing in for no prompt is no text


def is_data_path(text_or_path: str | Path) -> bool:
    """Whether `perplexity` reads `text_or_path` as a data path (a file, directory, glob or bundled corpus name,
    as training takes them) rather than as the text itself."""
    if isinstance(text_or_path, Path):
        return True
    spec = str(text_or_path)
    if "\n" in spec or len(spec) >= 1024:
        return False
    return spec in BUNDLED_CORPORA or os.path.exists(spec) or (has_wildcards(spec) and bool(glob.glob(spec)))


class ScoredCorpus(NamedTuple):
    tokens: TokenStream
    files: list[Path]  # the corpus files scored
    split: str | None  # the split they are, of a folder laid out in hub splits
    note: str  # which files those are, in one line


def scored_corpus(
    spec: str | Path,
    tokenizer: str = "gpt2",
    special_token_id: int | None = None,
    data_cache_dir: str | Path | None = None,
    text_column: str = "text",
    split: str | None = None,
) -> ScoredCorpus:
    """A data path's tokens exactly as training reads them (end-of-text after each document, cached on disk), with
    the files they come from: of a folder laid out in hub splits, the `split` files alone (default validation); see
    `corpus.scored_files`."""
    eot = get_tokenizer(tokenizer).eot_token if special_token_id is None else special_token_id
    files, split, note = scored_files(str(spec), split)
    cache_dir = data_cache_dir or DEFAULT_CACHE_DIR
    tokens = tokenize_corpus(
        str(spec), tokenizer, eot, cache_dir, role="evaluation", text_column=text_column, files=files
    )
    return ScoredCorpus(tokens[0], files, split, note)


def corpus_tokens(
    spec: str | Path,
    tokenizer: str = "gpt2",
    special_token_id: int | None = None,
    data_cache_dir: str | Path | None = None,
    text_column: str = "text",
    split: str | None = None,
) -> TokenStream:
    """The tokens of `scored_corpus`."""
    return scored_corpus(spec, tokenizer, special_token_id, data_cache_dir, text_column, split).tokens


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
        hidden = model.hidden_states(windows[:, :-1])
        # Each window's new targets: those after the previous window's end (start - stride + context).
        new = [min(start + context, n - 1) - (start - stride + context if start else 0) for start in group]
        scored = torch.cat([hidden[row, -k:] for row, k in enumerate(new)])
        targets = torch.cat([windows[row, -k:] for row, k in enumerate(new)])
        total += model.token_loss_sum(scored, targets).double()
    model.train(was_training)
    return total.item() / (n - 1), n - 1


def perplexity(
    model: GPTModel,
    text_or_path: str | Path,
    stride: int | None = None,
    tokenizer: str | None = None,
    batch_size: int = 4,
    data_cache_dir: str | Path | None = None,
    split: str | None = None,
) -> float:
    """exp(mean next-token loss) over a text, or over a data path (file, directory, glob, bundled corpus name)
    tokenized as training does it (of a folder laid out in hub splits, its `split` files: validation by default).
    Sliding windows of the model's context every `stride` tokens (default half the context): see
    `sliding_window_loss`. `python -m accel_gpt.evaluate` prints the same number."""
    return math.exp(_score(model, text_or_path, stride, tokenizer, batch_size, data_cache_dir, split)[0])


def bits_per_byte(
    model: GPTModel,
    text_or_path: str | Path,
    stride: int | None = None,
    tokenizer: str | None = None,
    batch_size: int = 4,
    data_cache_dir: str | Path | None = None,
    split: str | None = None,
) -> float:
    """The loss of `perplexity`'s tokens in bits per byte of their text: nats per token x tokens scored / (UTF-8
    bytes those tokens stand for x ln 2). Unlike a loss per token, it compares models with different tokenizers.
    `python -m accel_gpt.evaluate` prints it as `bpb`."""
    loss, scored, tokens = _score(model, text_or_path, stride, tokenizer, batch_size, data_cache_dir, split)
    return loss_in_bits_per_byte(loss, scored, target_bytes(tokens, tokenizer_of(model, tokenizer)))


def _score(model, text_or_path, stride, tokenizer, batch_size, data_cache_dir, split):
    """(mean loss, tokens scored, the tokens) of a text or data path, for perplexity and bits per byte, with the
    model's own tokenizer unless given."""
    tokenizer = tokenizer_of(model, tokenizer)
    if is_data_path(text_or_path):
        tokens = corpus_tokens(text_or_path, tokenizer, data_cache_dir=data_cache_dir, split=split)
    else:
        tokens = torch.tensor(get_tokenizer(tokenizer).encode_ordinary(str(text_or_path)))
    stride = default_stride(model) if stride is None else stride
    return (*sliding_window_loss(model, tokens, stride, batch_size), tokens)


def target_bytes(tokens: torch.Tensor | TokenStream, tokenizer: str = "gpt2") -> int:
    """The UTF-8 bytes of text that the targets `sliding_window_loss` scores, every token after the first, stand
    for (special tokens: none), read a million tokens at a time."""
    lengths, n = token_byte_lengths(tokenizer), len(tokens)
    read = tokens.read if isinstance(tokens, TokenStream) else lambda a, b: tokens[a:b].numpy()
    return sum(int(lengths[read(start, min(start + (1 << 20), n))].sum()) for start in range(1, n, 1 << 20))


def loss_in_bits_per_byte(loss: float, tokens: int, text_bytes: int) -> float | None:
    """A mean loss in nats per token over `tokens` tokens that stand for `text_bytes` bytes, in bits per byte
    (None for tokens that stand for no text)."""
    return loss * tokens / (text_bytes * math.log(2)) if text_bytes else None


def default_stride(model: GPTModel) -> int:
    """Half the context: each scored token (after the first window) sees at least half a context before it. The
    one default of `perplexity` and `python -m accel_gpt.evaluate`."""
    return max(1, model.config.context_len // 2)
