"""One training step (forward + backward + AdamW) of accel_gpt's GPTModel vs Hugging Face's GPT2LMHeadModel.

    python benchmarks/model_step.py [--rounds 7] [--threads 2] [--device cpu|cuda] [--gpt2_small]

Both models hold the same weights (GPT-2 layout: qkv bias, tied head, dropout 0, sdpa attention), see the same
batch in fp32 and take turns within each round, so machine noise hits both alike. accel_gpt's step is its
training path (`model(x, targets)`: chunked cross-entropy, no full logits); Hugging Face's is the usual
`cross_entropy(model(x).logits, targets)`. Prints per-round ratios, medians and the step-0 losses (which must
agree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from accel_gpt.hf import to_hf_model
from accel_gpt.model import GPTModel

SIZES = [  # (layers, dim, heads, context, batch)
    (2, 128, 4, 128, 8),
    (4, 256, 4, 256, 8),
]
GPT2_SMALL = (12, 768, 12, 1024, 1)  # the CPU case: ~5 s a step on 2 cores


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(layers, dim, heads, context, batch, rounds, device) -> dict:
    torch.manual_seed(0)
    ours = GPTModel(
        embedding_dim=dim,
        num_layers=layers,
        num_heads=heads,
        context_len=context,
        vocabulary_size=50257,
        dropout=0.0,
        qkv_bias=True,
        tie_weights=True,
    )
    hf = to_hf_model(ours).to(device).train()
    ours = ours.to(device).train()
    x = torch.randint(0, 50257, (batch, context), device=device)
    y = torch.randint(0, 50257, (batch, context), device=device)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in (("accel_gpt", ours), ("hf", hf))}
    with torch.no_grad():
        losses = {"accel_gpt": ours(x, y).item(), "hf": F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()}

    def step_ours():
        ours(x, y).backward()
        opts["accel_gpt"].step()
        opts["accel_gpt"].zero_grad(set_to_none=True)

    def step_hf():
        F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
        opts["hf"].step()
        opts["hf"].zero_grad(set_to_none=True)

    for step in (step_ours, step_hf):  # warm-up: allocator, kernels, optimizer state
        step()
        step()
    times = {"accel_gpt": [], "hf": []}
    for r in range(rounds):
        order = [("accel_gpt", step_ours), ("hf", step_hf)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(step, device))
    tokens = batch * context
    ratios = [h / o for o, h in zip(times["accel_gpt"], times["hf"])]
    return {
        "config": f"{layers}x{dim}, {heads} heads, ctx {context}, batch {batch}",
        "tokens_per_sec": {k: tokens / statistics.median(v) for k, v in times.items()},
        "speedup_median_of_round_ratios": statistics.median(ratios),
        "round_ratios": [round(r, 3) for r in ratios],
        "step0_loss": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--gpt2_small", action="store_true", help="gpt2-small at batch 1 x 1024 tokens instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [compare(*size, args.rounds, device) for size in ([GPT2_SMALL] if args.gpt2_small else SIZES)]
    print(f"device {device}, {args.threads} threads, fp32, torch {torch.__version__}")
    print("| config | accel_gpt tokens/s | HF tokens/s | speedup (median of round ratios) | step-0 loss (ours / HF) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in results:
        tps, loss = r["tokens_per_sec"], r["step0_loss"]
        print(
            f"| {r['config']} | {tps['accel_gpt']:,.0f} | {tps['hf']:,.0f} | "
            f"{r['speedup_median_of_round_ratios']:.2f}x | {loss['accel_gpt']:.5f} / {loss['hf']:.5f} |"
        )
        print(f"  per-round ratios: {r['round_ratios']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
