"""Generation speed with and without the KV cache: gpt2-small (random weights), greedy, side by side.

    python benchmarks/generation.py [--device cpu|cuda] [--new_tokens 512] [--prompt_tokens 16] [--rounds 1]

Each round generates `new_tokens` greedy tokens from the same prompt twice, with the cache (prefill once, one
position per token) and without it (the whole window re-run for every token, as before the cache), and checks
that both produce the same tokens. Prints tokens/s for each, the ratio per round, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from accel_gpt.model import PRESETS, GPTModel, generate_ids


def timed_generate(model, idx, new_tokens: int, use_cache: bool, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate_ids(model, idx, new_tokens, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new_tokens", type=int, default=512)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPTModel(**PRESETS[args.model], dropout=0.0).to(device).eval()
    idx = torch.randint(0, model.config.vocabulary_size, (1, args.prompt_tokens), device=device)
    generate_ids(model, idx, 4)  # warm-up: kernels, allocator
    generate_ids(model, idx, 4, use_cache=False)
    cached, uncached, same = [], [], True
    for r in range(args.rounds):
        t_cached, out_cached = timed_generate(model, idx, args.new_tokens, True, device)
        t_full, out_full = timed_generate(model, idx, args.new_tokens, False, device)
        same &= torch.equal(out_cached, out_full)
        cached.append(args.new_tokens / t_cached)
        uncached.append(args.new_tokens / t_full)
        print(
            f"round {r + 1}: cache {cached[-1]:,.1f} tokens/s ({t_cached:.1f} s) | no cache {uncached[-1]:,.1f} "
            f"tokens/s ({t_full:.1f} s) | {cached[-1] / uncached[-1]:.1f}x",
            flush=True,
        )
    result = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "cache_tokens_per_sec": statistics.median(cached),
        "no_cache_tokens_per_sec": statistics.median(uncached),
        "speedup": statistics.median(c / u for c, u in zip(cached, uncached)),
        "same_tokens": same,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
