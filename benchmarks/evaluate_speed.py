"""Scoring a corpus (`python -m accel_gpt.evaluate`) beside training, in tokens per second, side by side:

    python benchmarks/evaluate_speed.py [--models tiny mini] [--tokens 50000] [--batch-sizes 4 64]

For each model (random weights: speed does not depend on them) on the first `--tokens` tokens of Tiny Shakespeare:
- evaluate as it scores now: `sliding_window_loss` (hidden states, then the chunked loss on the scored positions);
- evaluate as it scored before: full `[batch, context, vocab]` logits and cross-entropy over every position (the
  same numbers; kept here only as the reference);
- training: forward, backward and AdamW steps of batch 8, the trainer's own step path (`model(x, targets)`).
Evaluation uses the default stride (half the context), so each scored token costs two positions of forward pass.
The variants alternate round by round; each figure is the median round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from accel_gpt.config import TrainConfig
from accel_gpt.inference import corpus_tokens, default_stride, sliding_window_loss
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer


@torch.no_grad()
def full_logits_loss(model: GPTModel, tokens: torch.Tensor, stride: int, batch_size: int) -> tuple[float, int]:
    """The scoring of earlier releases: every window's full logits, cross-entropy over every position."""
    context, n = model.config.context_len, len(tokens)
    last = max(0, -(-(n - 1 - context) // stride))
    starts = [k * stride for k in range(last + 1)]
    full = starts[:-1] if starts[-1] + context + 1 > n else starts
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [starts[len(full) :]]
    total = torch.zeros((), dtype=torch.float64)
    for group in filter(None, groups):
        windows = torch.stack([tokens[s : min(s + context + 1, n)] for s in group])
        logits = model(windows[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(group), -1)
        for row, start in enumerate(group):
            new = min(start + context, n - 1) - (start - stride + context if start else 0)
            total += losses[row, -new:].sum()
    return total.item() / (n - 1), n - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mini"])
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()
    corpus = corpus_tokens("tinyshakespeare")
    tokens = torch.from_numpy(corpus.read(0, min(args.tokens, len(corpus))))
    print(f"{len(tokens):,} tokens of Tiny Shakespeare, {torch.get_num_threads()} threads\n")
    print("| model | what | batch | tokens/s | vs training |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.models:
        torch.manual_seed(0)
        cfg = TrainConfig(model=name)
        model = GPTModel(cfg.model_config(50257)).eval()
        stride, context = default_stride(model), model.config.context_len
        optimizer = build_optimizer(model, cfg)
        x = torch.randint(0, 50257, (8, context))
        y = torch.randint(0, 50257, (8, context))

        def train() -> float:
            model.train()
            began = time.perf_counter()
            for _ in range(args.train_steps):
                model(x, y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.eval()
            return args.train_steps * x.numel() / (time.perf_counter() - began)

        now, before = sliding_window_loss(model, tokens, stride, 4)[0], full_logits_loss(model, tokens, stride, 4)[0]
        assert abs(now - before) < 1e-5 * before, (now, before)  # the same numbers, only faster
        variants = {("training", 8): train}
        for batch in args.batch_sizes:
            variants[("evaluate", batch)] = lambda b=batch: score(sliding_window_loss, model, tokens, stride, b)
            variants[("evaluate, full logits (before)", batch)] = lambda b=batch: score(
                full_logits_loss, model, tokens, stride, b
            )
        rates = {key: [] for key in variants}
        keys = list(variants)
        for r in range(args.rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                rates[key].append(variants[key]())
        trained = statistics.median(rates["training", 8])
        for (what, batch), values in rates.items():
            rate = statistics.median(values)
            print(f"| {name} | {what} | {batch} | {rate:,.0f} | {rate / trained:.2f}x |")


def score(fn, model, tokens, stride, batch) -> float:
    began = time.perf_counter()
    _, scored = fn(model, tokens, stride, batch)
    return scored / (time.perf_counter() - began)


if __name__ == "__main__":
    main()
