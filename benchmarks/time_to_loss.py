"""Wall time to a validation loss: the GPT-2 recipe (today's defaults) against the `fast` recipe, and every option of
the recipe alone and removed, at the same depth, width, context and tokens per step.

    python benchmarks/time_to_loss.py --size mini [--seeds 0 1] [--phases all]
    python benchmarks/time_to_loss.py --size wide   # 4 layers x 256 wide

Method. A run's losses depend only on its settings (training is deterministic on CPU), while its speed depends on
how busy the machine is. So the two are measured apart:

1. `lengths`: each recipe trains for fractions of the GPT-2 recipe's run (one epoch of Tiny Shakespeare, 297
   steps of 8 x 128 tokens) and is evaluated once at its end on the whole validation split (`--eval_iter 33`):
   its final validation loss when planned that long (a warmup-stable-decay run decays at its own end). The target
   is the GPT-2 recipe's final validation loss; the steps a recipe needs are interpolated between its lengths.
2. `timing`: each recipe's trainer runs 30 steps in a fresh process, the recipes interleaved, 3 rounds; the median
   step time of each (steps 6-30) gives seconds per step, measured side by side. Wall time = steps x that. Then
   the fast recipe trains for as many steps as fit in the GPT-2 recipe's wall time: the losses at equal time.
3. `optimizer`: the optimizer's step alone (AdamW, Muon + AdamW) on the model, interleaved: Muon's Newton-Schulz cost.
4. `ablations`: at one length, the recipe without each option, and the GPT-2 recipe with each option alone.
5. `sweep`: the recipe's learning rates at one length.
6. `documents`: the recipe on Tiny Shakespeare cut into its speeches (a document per block between blank lines), at
   one length, with `--align_documents`, `--document_mask`, both or neither: the held-out loss at equal steps, then
   each option's step time (interleaved as in `timing`) and its loss at the wall time of the run without them.

Results are cached in `benchmarks/results/time_to_loss-<size>.json` (a run's settings are its key), so phases can
run separately and a rerun only trains what is missing; the report is printed from the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EPOCH = 297  # optimizer steps in one epoch of Tiny Shakespeare at 8 x 128 tokens: the GPT-2 recipe's run
SIZES = {
    "mini": ["--model", "mini"],
    "wide": ["--model", "mini", "--num_layers", "4", "--embedding_dim", "256", "--num_heads", "4"],
}
FAST = {  # accel_gpt/configs/fast.yaml, flag by flag, so that ablations can drop one
    "muon": ["--optimizer", "muon", "--muon_learning_rate", "0.004"],
    "lr": ["--learning_rate", "0.006"],
    "wsd": ["--lr_schedule", "wsd", "--decay_fraction", "0.2"],
    "rotary": ["--position", "rotary"],
    "rmsnorm": ["--norm", "rmsnorm"],
    "qk_norm": ["--qk_norm", "true"],
    "relu2": ["--activation", "relu2"],
    "zero_init": ["--zero_init_projections", "true"],
}
# Windows that start at a document, and attention that stops at one (phase `documents`).
DOCUMENT_OPTIONS = {
    "neither": [],
    "align_documents": ["--align_documents", "true"],
    "document_mask": ["--document_mask", "true"],
    "both": ["--align_documents", "true", "--document_mask", "true"],
}
# Options measured but left out of the recipe (benchmarks/RESULTS.md says why): tried as additions to it.
EXTRA = {"softcap": ["--logit_softcap", "15"]}


MUON_RATES, ADAMW_RATES = ("0.002", "0.004", "0.008", "0.016"), ("0.001", "0.003", "0.006", "0.012")


def sweep_flags(muon_lr: str, lr: str) -> list[str]:
    """The recipe with these two learning rates."""
    return [*recipe([o for o in FAST if o not in ("muon", "lr")]), "--optimizer", "muon", "--muon_learning_rate",
            muon_lr, "--learning_rate", lr]  # fmt: skip


def recipe(options: list[str]) -> list[str]:
    return [flag for name in options for flag in (FAST | EXTRA)[name]]


def run_key(size: str, flags: list[str], steps: int, seed: int) -> str:
    return json.dumps([size, flags, steps, seed])


def train(size: str, flags: list[str], steps: int, seed: int, work: Path) -> dict:
    """One run in a fresh process: its final validation loss, evaluated on the whole validation split."""
    out = work / f"run-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "accel_gpt.train", *SIZES[size], *flags, "--max_steps", str(steps),
        "--warmup_steps", str(min(20, steps // 5)), "--eval_freq", str(steps), "--eval_iter", "33", "--seed", str(seed),
        "--sample_tokens", "0", "--save_freq", str(10 * steps), "--output_dir", str(out),
        "--data_cache_dir", str(work / "cache"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"val_loss": records[-1]["val_loss"], "train_loss": records[-1]["train_loss"]}


def step_seconds(size: str, flags: list[str], work: Path) -> float:
    """Median seconds per step of the trainer over steps 6-30 (no evaluation), in a fresh process."""
    out = work / f"time-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "accel_gpt.train", *SIZES[size], *flags, "--max_steps", "30", "--warmup_steps", "5",
        "--eval_freq", "0", "--save_freq", "1000", "--output_dir", str(out), "--data_cache_dir", str(work / "cache"),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = 8 * 128
    return statistics.median(tokens / r["tokens_per_sec"] for r in records[5:])


def speeches() -> list[str]:
    """Tiny Shakespeare as JSON lines of a document per speech (the blocks between blank lines), in a file whose path
    is the same at every run (the results' cache keys hold it): the flags that train on it."""
    import re
    from importlib import resources

    path = Path(tempfile.gettempdir()) / "accel-gpt-tinyshakespeare-speeches.jsonl"
    if not path.exists():
        text = (resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt").read_text()
        blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
        path.write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks))
    return ["--train_data_path", str(path)]


class TorchMuonWithAdamW:
    """torch.optim.Muon (Newton-Schulz in bf16) on the hidden matrices and fused AdamW on the rest: the alternative
    to accel_gpt's fp32 Muon, timed beside it."""

    def __init__(self, model):
        import torch

        from accel_gpt.optim import MUON_PARAMETERS

        named = list(model.named_parameters())
        self.muon = torch.optim.Muon([p for n, p in named if MUON_PARAMETERS.search(n)], lr=0.02)
        self.adamw = torch.optim.AdamW([p for n, p in named if not MUON_PARAMETERS.search(n)], lr=1e-3, fused=True)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()


def optimizer_step_ms(size: str) -> dict[str, float]:
    """The optimizer's step alone on the model with random gradients, interleaved: AdamW, accel_gpt's Muon + AdamW,
    and torch.optim.Muon + AdamW."""
    import torch

    from accel_gpt.config import parse_config
    from accel_gpt.model import GPTModel
    from accel_gpt.optim import build_optimizer

    cfgs = {name: parse_config([*SIZES[size], "--optimizer", name]) for name in ("adamw", "muon")}
    model = GPTModel(cfgs["adamw"].model_config(50257))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {name: build_optimizer(model, cfg) for name, cfg in cfgs.items()}
    optimizers["torch muon"] = TorchMuonWithAdamW(model)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(3):  # few steps: torch's bf16 Newton-Schulz takes seconds a step on a CPU without bf16
        for name, opt in optimizers.items():
            opt.step()  # warm-up: state created
            start = time.perf_counter()
            for _ in range(3):
                opt.step()
            times[name].append((time.perf_counter() - start) / 3 * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}, "timing": {}, "optimizer": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))

    def run(self, size: str, flags: list[str], steps: int, seed: int, work: Path) -> dict:
        key = run_key(size, flags, steps, seed)
        if key not in self.data["runs"]:
            started = time.perf_counter()
            self.data["runs"][key] = train(size, flags, steps, seed, work)
            print(f"  {steps:4d} steps seed {seed} {' '.join(flags) or 'GPT-2 recipe'}: "
                  f"val {self.data['runs'][key]['val_loss']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
            self.save()
        return self.data["runs"][key]


def steps_to(losses: dict[int, float], target: float) -> float | None:
    """Steps at which the final loss would reach `target`, interpolated between planned lengths (None: never)."""
    points = sorted(losses.items())
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l0 > target >= l1:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return points[0][0] if points and points[0][1] <= target else None


def equal_time_steps(timing: dict) -> int:
    """The fast recipe's steps in the GPT-2 recipe's wall time (its 297 steps), from the measured step times."""
    return round(EPOCH * timing["gpt2"]["median"] / timing["fast"]["median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="mini")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.15, 0.2, 0.25, 0.3, 0.4, 0.5])
    parser.add_argument("--ablation-fraction", type=float, default=0.5)
    parser.add_argument("--phases", nargs="+", default=["all"],
                        choices=["all", "lengths", "timing", "optimizer", "ablations", "sweep", "documents",
                                 "report"])  # fmt: skip
    args = parser.parse_args()
    phases = set(args.phases)
    every = "all" in phases
    cache = Cache(REPO / "benchmarks" / "results" / f"time_to_loss-{args.size}.json")
    work = Path(tempfile.mkdtemp(prefix="time-to-loss-"))
    size, fast = args.size, recipe(list(FAST))
    short = round(EPOCH * args.ablation_fraction)
    lengths = sorted({round(EPOCH * f) for f in args.fractions} | {EPOCH})

    if every or "lengths" in phases:
        print("lengths:", flush=True)
        for seed in args.seeds:
            cache.run(size, [], EPOCH, seed, work)
            for steps in lengths:
                cache.run(size, fast, steps, seed, work)
    if every or "sweep" in phases:
        print("sweep:", flush=True)
        for muon_lr in MUON_RATES:
            for lr in ADAMW_RATES:
                cache.run(size, sweep_flags(muon_lr, lr), short, args.seeds[0], work)
    if every or "ablations" in phases:
        print("ablations:", flush=True)
        for seed in args.seeds:
            cache.run(size, [], short, seed, work)
            cache.run(size, fast, short, seed, work)
            for option in FAST:
                cache.run(size, recipe([o for o in FAST if o != option]), short, seed, work)
                cache.run(size, recipe(["lr", option] if option == "wsd" else [option]), short, seed, work)
            for option in EXTRA:
                cache.run(size, recipe([*FAST, option]), short, seed, work)
                cache.run(size, recipe([option]), short, seed, work)
    if every or "timing" in phases:
        print("timing:", flush=True)
        variants = {"gpt2": [], "fast": fast, "fast without muon": recipe([o for o in FAST if o != "muon"])}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(3):
            for name, flags in variants.items():
                times[name].append(step_seconds(size, flags, work))
        cache.data["timing"] = {name: {"runs": t, "median": statistics.median(t)} for name, t in times.items()}
        cache.save()
        print("equal wall time:", flush=True)
        for seed in args.seeds:  # the fast recipe planned for the GPT-2 recipe's wall time
            cache.run(size, fast, equal_time_steps(cache.data["timing"]), seed, work)
    if every or "optimizer" in phases:
        cache.data["optimizer"] = optimizer_step_ms(size)
        cache.save()
    if every or "documents" in phases:
        print("documents:", flush=True)
        corpus = fast + speeches()
        for seed in args.seeds:
            for flags in DOCUMENT_OPTIONS.values():
                cache.run(size, corpus + flags, short, seed, work)
        times = {name: [] for name in DOCUMENT_OPTIONS}
        for _ in range(3):
            for name, flags in DOCUMENT_OPTIONS.items():
                times[name].append(step_seconds(size, corpus + flags, work))
        cache.data["document_timing"] = {name: {"runs": t, "median": statistics.median(t)} for name, t in times.items()}
        cache.save()
        for seed in args.seeds:  # each planned for the wall time of the run with neither
            for name, flags in DOCUMENT_OPTIONS.items():
                cache.run(size, corpus + flags, document_equal_steps(cache, name, short), seed, work)
    report(cache, size, args.seeds, lengths, short)
    report_documents(cache, size, args.seeds, short)


def document_equal_steps(cache: Cache, name: str, short: int) -> int:
    timing = cache.data["document_timing"]
    return round(short * timing["neither"]["median"] / timing[name]["median"])


def report_documents(cache: Cache, size: str, seeds: list[int], short: int) -> None:
    timing = cache.data.get("document_timing")
    if not timing:
        return
    corpus = recipe(list(FAST)) + speeches()

    def losses(flags: list[str], steps: int) -> list[float]:
        return [r["val_loss"] for seed in seeds if (r := cache.data["runs"].get(run_key(size, flags, steps, seed)))]

    print(f"\n## {size}: the fast recipe on Tiny Shakespeare's speeches, {short} steps (held-out loss, seeds "
          f"{', '.join(map(str, seeds))})")  # fmt: skip
    print("| windows | at equal steps | seconds per step | steps in the time of neither | at equal time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, flags in DOCUMENT_OPTIONS.items():
        steps = document_equal_steps(cache, name, short)
        at_steps, at_time = losses(corpus + flags, short), losses(corpus + flags, steps)
        shown = [f"{np.mean(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})" if v else "-" for v in (at_steps, at_time)]
        print(f"| {name} | {shown[0]} | {timing[name]['median']:.3f} | {steps} | {shown[1]} |")


def report(cache: Cache, size: str, seeds: list[int], lengths: list[int], short: int) -> None:
    runs = cache.data["runs"]

    def val(flags: list[str], steps: int, seed: int) -> float | None:
        found = runs.get(run_key(size, flags, steps, seed))
        return found["val_loss"] if found else None

    fast = recipe(list(FAST))
    print(f"\n## {size}: time to the GPT-2 recipe's final validation loss")
    timing = cache.data.get("timing", {})
    rows = []
    for seed in seeds:
        target = val([], EPOCH, seed)
        curve = {s: v for s in lengths if (v := val(fast, s, seed)) is not None}
        if target is None or not curve:
            continue
        needed = steps_to(curve, target)
        rows.append((seed, target, needed, curve))
    if rows:
        print("| seed | GPT-2 recipe, 297 steps | fast recipe at " + ", ".join(str(s) for s in lengths) + " steps "
              "| steps to the target |")  # fmt: skip
        print("| --- | ---: | --- | ---: |")
        for seed, target, needed, curve in rows:
            shown = ", ".join(f"{curve[s]:.3f}" for s in sorted(curve))
            print(
                f"| {seed} | {target:.3f} | {shown} | {needed:.0f} |"
                if needed
                else f"| {seed} | {target:.3f} | {shown} | not reached |"
            )
    if timing:
        gpt2, fast_s = timing["gpt2"]["median"], timing["fast"]["median"]
        print("\nseconds per step (median of 3 interleaved fresh processes, steps 6-30): "
              + ", ".join(f"{n} {t['median']:.3f} ({' '.join(f'{x:.3f}' for x in t['runs'])})" for n, t in timing.items()))  # fmt: skip
        needed = [r[2] for r in rows if r[2]]
        if needed:
            step_ratio = np.mean(needed) / EPOCH
            print(
                f"steps to the target: {step_ratio:.2f}x; seconds per step: {fast_s / gpt2:.2f}x; "
                f"**wall time to the target: {step_ratio * fast_s / gpt2:.2f}x** (goal <= 0.5x)"
            )
        equal_time = equal_time_steps(timing)
        print(f"equal wall time: the fast recipe's {EPOCH} x {gpt2:.3f} / {fast_s:.3f} = {equal_time} steps")
        for seed in seeds:
            if (ours := val(fast, equal_time, seed)) is not None and (theirs := val([], EPOCH, seed)) is not None:
                print(f"  seed {seed}: GPT-2 recipe {theirs:.3f}, fast recipe {ours:.3f}: {theirs - ours:+.3f} nats")
    if optimizer := cache.data.get("optimizer"):
        print(f"optimizer step alone: AdamW {optimizer['adamw']:.1f} ms, Muon + AdamW {optimizer['muon']:.1f} ms, "
              f"torch.optim.Muon + AdamW {optimizer['torch muon']:.1f} ms")  # fmt: skip

    print(f"\n## {size}: ablations at {short} steps (final validation loss; lower is better)")
    print("| option | the fast recipe without it (with it, for options not in it) | the GPT-2 recipe with it alone |")
    print("| --- | ---: | ---: |")

    def mean(flags: list[str]) -> str:
        found = [v for seed in seeds if (v := val(flags, short, seed)) is not None]
        return f"{np.mean(found):.3f}" if found else "-"

    print(f"| (none) | {mean(fast)} | {mean([])} |")
    for option in FAST:
        alone = recipe(["lr", option] if option == "wsd" else [option])
        print(f"| {option} | {mean(recipe([o for o in FAST if o != option]))} | {mean(alone)} |")
    for option in EXTRA:
        print(f"| + {option} | {mean(recipe([*FAST, option]))} | {mean(recipe([option]))} |")
    if any(val(sweep_flags(m, lr), short, seeds[0]) for m in MUON_RATES for lr in ADAMW_RATES):
        print(f"\n## {size}: learning rates at {short} steps (seed {seeds[0]}; final validation loss)")
        print("| muon_learning_rate \\ learning_rate | " + " | ".join(ADAMW_RATES) + " |")
        print("| --- |" + " ---: |" * len(ADAMW_RATES))
        for m in MUON_RATES:
            found = [val(sweep_flags(m, lr), short, seeds[0]) for lr in ADAMW_RATES]
            print(f"| {m} | " + " | ".join(f"{v:.3f}" if v else "-" for v in found) + " |")


if __name__ == "__main__":
    main()
