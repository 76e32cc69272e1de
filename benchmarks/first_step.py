"""Time from launch to the first optimizer step on a large local parquet corpus: cold token cache, warm token cache,
and streaming; and what streaming delivers against what training consumes.

    python benchmarks/first_step.py [--gigabytes 1.0] [--steps 60]

Builds a hub-layout parquet folder of about `--gigabytes` of text (Tiny Shakespeare's paragraphs as documents,
each copy numbered; 8 train shards and one validation shard) and one a tenth of its size, then runs
`python -m accel_gpt.train` (the default `mini` model, one process) and takes the time from the process's start
to its first record in metrics.jsonl:

1. cold: `--train_data_path FOLDER` into an empty token cache (hash, tokenize, then train);
2. warm: the same command again (hash the files, find the tokens);
3. streaming: `--train_data_path FOLDER --streaming true` (2 stream workers), at both corpus sizes.

Then `--steps` steps of training on the warm cache and streaming, side by side: training tokens/s (median of the
steps after the first 10). And the stream alone: windows/s that `StreamBatches` (2 workers) delivers in 20 s,
against the tokens/s that the cached run trained at.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_corpus(folder: Path, gigabytes: float) -> float:
    """A hub-layout parquet corpus of about `gigabytes` of text; returns the text's size in GB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    copies = max(8, int(gigabytes * 1e9 / len(text.encode())))
    data = folder / "data"
    data.mkdir(parents=True)
    per_shard, size = -(-copies // 8), 0
    for shard in range(8):
        rows = [
            f"Copy {c}.\n{p}"
            for c in range(shard * per_shard, min(copies, (shard + 1) * per_shard))
            for p in paragraphs
        ]
        size += sum(len(r.encode()) for r in rows)
        pq.write_table(pa.table({"text": rows}), data / f"train-{shard:05d}-of-00008.parquet", row_group_size=4096)
    pq.write_table(pa.table({"text": paragraphs[:2000]}), data / "validation-00000-of-00001.parquet")
    return size / 1e9


def run(args: list[str], out: Path, steps: int) -> dict:
    """The trainer in a fresh process: seconds from start to the first metrics record, and its records."""
    cmd = [sys.executable, "-m", "accel_gpt.train", *args, "--output_dir", str(out), "--max_steps", str(steps),
           "--eval_freq", "0", "--warmup_steps", "0", "--save_freq", "100000"]  # fmt: skip
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    first = None
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    first = first if first is not None else time.perf_counter() - start
    tokenized = [line for line in stdout.splitlines() if line.startswith("tokenized")]
    return {"first_step_s": first, "records": records, "tokenized": tokenized}


def steady_tokens_per_sec(records: list[dict]) -> float:
    return statistics.median(r["tokens_per_sec"] for r in records[10:])


def stream_alone(folder: Path, seconds: float = 20.0) -> float:
    """Tokens/s of windows that the stream hands the training process, with nothing training."""
    from accel_gpt.data.sources import resolve_data
    from accel_gpt.data.streaming import FileSource, ReaderDataset, Readers, StreamBatches

    files = resolve_data(str(folder), None)
    readers = ReaderDataset(FileSource(files.train, "text"), Readers(count=2, seed=0), 0, 2, "gpt2", 50256)
    stream = StreamBatches(readers, 2, batch_size=8, context_len=128, stride=128, buffer_size=1000, device="cpu")
    stream.next_batch()  # the workers start and the buffer fills
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        stream.next_batch()
        batches += 1
    return batches * 8 * 128 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="first-step-"))
    try:
        big, small = work / "big", work / "small"
        big_gb, small_gb = build_corpus(big, args.gigabytes), build_corpus(small, args.gigabytes / 10)
        parquet_gb = sum(f.stat().st_size for f in (big / "data").iterdir()) / 1e9
        print(f"corpus: {big_gb:.2f} GB of text in {parquet_gb:.2f} GB of parquet; small: {small_gb:.2f} GB of text")
        cache = ["--data_cache_dir", str(work / "cache")]
        results = {
            "cold cache": run(["--train_data_path", str(big), *cache], work / "cold", 1),
            "warm cache": run(["--train_data_path", str(big), *cache], work / "warm", 1),
            "streaming": run(["--train_data_path", str(big), "--streaming", "true", *cache], work / "stream", 1),
            "streaming, a tenth of the corpus": run(
                ["--train_data_path", str(small), "--streaming", "true", *cache], work / "stream-small", 1
            ),
        }
        print("| run | launch to first step (s) |")
        print("| --- | ---: |")
        for name, result in results.items():
            print(f"| {name} | {result['first_step_s']:.1f} |")
        print("cold cache said: " + " / ".join(results["cold cache"]["tokenized"]))

        cached = run(["--train_data_path", str(big), *cache], work / "cached-steps", args.steps)
        streamed = run(
            ["--train_data_path", str(big), "--streaming", "true", *cache], work / "stream-steps", args.steps
        )
        cached_rate, streamed_rate = (
            steady_tokens_per_sec(cached["records"]),
            steady_tokens_per_sec(streamed["records"]),
        )
        print(
            f"training tokens/s over {args.steps} steps (median after step 10): cached {cached_rate:,.0f}, streaming "
            f"{streamed_rate:,.0f} ({streamed_rate / cached_rate:.2f}x)"
        )
        alone = stream_alone(big)
        print(
            f"the stream alone: {alone:,.0f} tokens/s = {alone / cached_rate:.1f}x what mini trains on ({cached_rate:,.0f})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
