"""A trained tokenizer against GPT-2's: compression, encoding speed, and the wall time to a loss.

    python benchmarks/tokenizer.py [--phases all|compression|encoding|loss] [--seed 0]

Both corpora are cut once into a training file (the first 90% of the text) and a validation file (the last 10%),
so every tokenizer is trained on the first and measured on the second:

1. `compression`: `python -m accel_gpt.tokenizer train` at 4k, 8k, 16k and 32k ids on 西游记 and Tiny Shakespeare's
   training files: training time, and tokens per character and bytes per token of the validation file, beside
   GPT-2's.
2. `encoding`: the trainer's tokenizing pipeline (`tokenize_corpus`, every core, an empty cache) on 西游记 with
   GPT-2's tokenizer and with the 8k one, interleaved, 3 rounds each: bytes of text per second.
3. `loss`: `mini` on 西游记 (the `xiyouji` config: context 256, 1,000 steps of 8 windows) with GPT-2's vocabulary,
   then the same model and config with the 8k tokenizer, evaluated every 10 steps on the validation file. Losses
   are deterministic; seconds per step come from short runs of both, interleaved 3 times. The wall time the
   second takes to reach the first's final `val_bpb`, and its `val_bpb` at the first's wall time. Goal: <= 0.35x
   the wall time, and a lower `val_bpb`.

Results go to `benchmarks/results/tokenizer.json`; a phase run again replaces its own entry, and `--phases report`
prints what is there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "tokenizer.json"
SIZES = (4096, 8192, 16384, 32768)
CORPORA = ("xiyouji", "tinyshakespeare")


def split_corpus(name: str, work: Path) -> tuple[Path, Path]:
    """The corpus's first 90% of characters and its last 10%, as two files."""
    text = (resources.files("accel_gpt") / "assets" / f"{name}.txt").read_text()
    cut = int(len(text) * 0.9)
    train, val = work / f"{name}-train.txt", work / f"{name}-val.txt"
    train.write_text(text[:cut])
    val.write_text(text[cut:])
    return train, val


def train_tokenizer(corpus: Path, size: int, out: Path) -> float:
    """Seconds to train a tokenizer of `size` ids on `corpus`, in a fresh process (its own start excluded)."""
    began = time.perf_counter()
    cmd = [sys.executable, "-m", "accel_gpt.tokenizer", "train", "--data", str(corpus), "--vocab_size", str(size),
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - began


def compression_of(tokenizer: str, text: str) -> dict:
    from accel_gpt.tokenizer import get_tokenizer

    tokens = len(get_tokenizer(tokenizer).encode_ordinary(text))
    return {"tokens_per_char": tokens / len(text), "bytes_per_token": len(text.encode()) / tokens}


def compression(work: Path) -> dict:
    results = {}
    for name in CORPORA:
        train, val = split_corpus(name, work)
        text = val.read_text()
        rows = {"gpt2": compression_of("gpt2", text) | {"train_seconds": None}}
        for size in SIZES:
            out = work / f"{name}-{size}"
            seconds = train_tokenizer(train, size, out)
            rows[str(size)] = compression_of(str(out), text) | {"train_seconds": seconds}
            print(f"  {name} {size}: {rows[str(size)]}", flush=True)
        results[name] = rows
    return results


def encode_once(tokenizer: str, corpus: Path, cache: Path) -> float:
    """Bytes per second of `tokenize_corpus` on every core into an empty cache, in a fresh process."""
    code = f"""
import time
from accel_gpt.data.tokens import tokenize_corpus
from accel_gpt.tokenizer import get_tokenizer
began = time.perf_counter()
tokenize_corpus({str(corpus)!r}, {tokenizer!r}, get_tokenizer({tokenizer!r}).eot_token, {str(cache)!r})
print(time.perf_counter() - began)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    return corpus.stat().st_size / float(out.stdout.strip().splitlines()[-1])


def encoding(work: Path) -> dict:
    train, _ = split_corpus("xiyouji", work)
    trained = work / "xiyouji-8192-encoding"
    if not trained.exists():
        train_tokenizer(train, 8192, trained)
    rates = {"gpt2": [], "8192": []}
    for round_ in range(3):
        for name, tokenizer in (("gpt2", "gpt2"), ("8192", str(trained))):
            rates[name].append(encode_once(tokenizer, train, work / f"cache-{name}-{round_}"))
    return {name: {"runs": r, "median": statistics.median(r)} for name, r in rates.items()}


def run(flags: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "accel_gpt.train", "--config", "xiyouji", *flags, "--output_dir", str(out),
           "--sample_tokens", "0", "--save_freq", "100000"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_seconds(flags: list[str], work: Path) -> float:
    """Median seconds per step over steps 6-30 of a fresh 30-step run (no evaluation)."""
    short = ["--max_steps", "30", "--warmup_steps", "5", "--eval_freq", "0"]
    records = run([*flags, *short], work / f"timing-{time.time_ns()}")
    return statistics.median(r["step_time"] for r in records[5:])


def loss(work: Path, seed: int) -> dict:
    """Losses from one run each (deterministic), step times from short runs interleaved 3 times (the machine's
    load moves both alike): wall time = steps x median seconds per step."""
    train, val = split_corpus("xiyouji", work)
    trained = work / "xiyouji-8192-loss"
    if not trained.exists():
        train_tokenizer(train, 8192, trained)
    data = ["--train_data_path", str(train), "--val_data_path", str(val), "--seed", str(seed),
            "--data_cache_dir", str(work / "cache")]  # fmt: skip
    ours_flags = [*data, "--tokenizer", str(trained)]
    gpt2 = run([*data, "--eval_freq", "1000"], work / "gpt2")
    ours = run([*ours_flags, "--eval_freq", "10"], work / "ours")
    times: dict[str, list[float]] = {"gpt2": [], "trained": []}
    for _ in range(3):
        times["gpt2"].append(step_seconds(data, work))
        times["trained"].append(step_seconds(ours_flags, work))
    per_step = {name: statistics.median(t) for name, t in times.items()}
    steps, target = gpt2[-1]["step"], gpt2[-1]["val_bpb"]
    evaluated = [r for r in ours if "val_bpb" in r]
    reached = next((r["step"] for r in evaluated if r["val_bpb"] <= target), None)
    equal_time = steps * per_step["gpt2"] / per_step["trained"]  # the trained run's steps in GPT-2's wall time
    # Past its own last step the run did not go on: its bpb there is not the bpb at GPT-2's wall time.
    at_time = [r for r in evaluated if r["step"] <= equal_time] if equal_time <= evaluated[-1]["step"] else []
    return {
        "seconds_per_step": {name: {"runs": t, "median": per_step[name]} for name, t in times.items()},
        "gpt2": {"steps": steps, "val_bpb": target, "seconds": steps * per_step["gpt2"]},
        "trained": {"step_to_target": reached,
                    "seconds_to_target": reached * per_step["trained"] if reached else None,
                    "val_bpb_at_gpt2_time": at_time[-1]["val_bpb"] if at_time else None,
                    "steps": evaluated[-1]["step"], "seconds": evaluated[-1]["step"] * per_step["trained"],
                    "final_val_bpb": evaluated[-1]["val_bpb"]},
    }  # fmt: skip


def report(results: dict) -> None:
    if "compression" in results:
        print("\n## Compression on the held-out last 10% (tokens per character; bytes per token; seconds to train)")
        print("| corpus | GPT-2 | " + " | ".join(f"{s // 1024}k" for s in SIZES) + " |")
        print("| --- | ---: |" + " ---: |" * len(SIZES))
        for name, rows in results["compression"].items():
            cells = [f"{r['tokens_per_char']:.2f}; {r['bytes_per_token']:.2f}" for r in rows.values()]
            timed = [f"{c}; {rows[str(s)]['train_seconds']:.1f} s" for c, s in zip(cells[1:], SIZES)]
            print(f"| {name} | {cells[0]} | " + " | ".join(timed) + " |")
    if "encoding" in results:
        enc = results["encoding"]
        print(f"\n## Encoding 西游记 on every core (bytes per second, median of 3 interleaved): GPT-2 "
              f"{enc['gpt2']['median'] / 1e6:.2f} MB/s, 8k {enc['8192']['median'] / 1e6:.2f} MB/s "
              f"({enc['8192']['median'] / enc['gpt2']['median']:.2f}x)")  # fmt: skip
    if "loss" in results:
        result = results["loss"]
        gpt2, ours, per_step = result["gpt2"], result["trained"], result["seconds_per_step"]
        ratio = per_step["trained"]["median"] / per_step["gpt2"]["median"]
        print(f"\n## Time to a loss: mini on 西游记 (the xiyouji config), GPT-2's vocabulary, {gpt2['steps']} steps: "
              f"val_bpb {gpt2['val_bpb']:.3f}")  # fmt: skip
        print(f"seconds per step (median of 3 interleaved): GPT-2 {per_step['gpt2']['median']:.3f}, 8k "
              f"{per_step['trained']['median']:.3f} ({ratio:.2f}x)")  # fmt: skip
        if ours["step_to_target"] is not None:
            print(f"8k tokenizer: GPT-2's final val_bpb at step {ours['step_to_target']}: "
                  f"**{ours['seconds_to_target'] / gpt2['seconds']:.3f}x the wall time** (goal <= 0.35x)")  # fmt: skip
        else:
            print("8k tokenizer: never reached GPT-2's final val_bpb")
        if ours["val_bpb_at_gpt2_time"] is not None:
            print(f"at GPT-2's wall time: val_bpb {ours['val_bpb_at_gpt2_time']:.3f} against {gpt2['val_bpb']:.3f}")
        print(f"after its {ours['steps']} steps ({ours['seconds'] / gpt2['seconds']:.2f}x GPT-2's wall time): val_bpb "
              f"{ours['final_val_bpb']:.3f} against {gpt2['val_bpb']:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phases", nargs="+", default=["all"], choices=["all", "compression", "encoding", "loss", "report"]
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="tokenizer-bench-"))
    for phase, measure in (("compression", compression), ("encoding", encoding), ("loss", loss)):
        if "all" in args.phases or phase in args.phases:
            print(f"{phase}:", flush=True)
            results[phase] = measure(work, args.seed) if phase == "loss" else measure(work)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
    report(results)


if __name__ == "__main__":
    main()
