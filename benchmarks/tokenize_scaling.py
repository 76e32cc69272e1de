"""Tokenizing with processes: tokens/s per core, the pipeline against raw tiktoken, at 1 and N workers.

    python benchmarks/tokenize_scaling.py [--files 40] [--workers 2] [--repeats 3]

Each measurement runs in a fresh process (as the trainer tokenizes at start-up), on the same corpus (`--files`
copies of Tiny Shakespeare, each headed by its number), the variants interleaved, best of `--repeats`:

- raw, 1 process: tiktoken's `encode_to_numpy` over the files' text, read whole, in one process: the ceiling of
  one core;
- raw, N batch threads: `encode_ordinary_batch(num_threads=N)`, tiktoken's own parallelism;
- raw, N threads and N processes: `encode_to_numpy` in a pool of N threads or N forked processes, 1 MiB of text
  per task: the same work, parallel in two ways;
- pipeline, `num_proc` 1 and N: `tokenize_corpus` into an empty cache (hashing, reading in pieces, encoding in
  worker processes, writing and hashing the token file).

It also reports how much CPU the pipeline's own process spends per CPU second of its workers: the number of
workers one process can keep busy, which sets `MAX_TOKENIZER_PROCESSES`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from importlib import resources
from pathlib import Path

VARIANTS = ("raw-1-process", "raw-batch-threads", "raw-threads", "raw-processes", "pipeline-1", "pipeline-n")


def encode_text(text: str) -> int:
    from accel_gpt.tokenizer import get_tokenizer

    return len(get_tokenizer("gpt2").encode_to_numpy(text, disallowed_special=())) + 1


def child(variant: str, corpus: Path, cache: Path, workers: int) -> None:
    """One timed tokenization (imports excluded); prints wall seconds, this process's CPU seconds, its finished
    children's CPU seconds and the token count as JSON."""
    import concurrent.futures.process  # noqa: F401 (imported on first use: a one-time cost, not per token)

    from accel_gpt.data.tokens import tokenize_corpus
    from accel_gpt.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")
    files = sorted(corpus.iterdir())
    start, before = time.perf_counter(), os.times()
    if variant.startswith("raw"):
        texts = [f.read_text(encoding="utf-8") for f in files]
        if variant == "raw-1-process":
            tokens = sum(encode_text(t) for t in texts)
        elif variant == "raw-batch-threads":
            tokens = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts, num_threads=workers))
        else:
            pieces = [t[i : i + (1 << 20)] for t in texts for i in range(0, len(t), 1 << 20)]
            if variant == "raw-threads":
                pool = ThreadPoolExecutor(workers)
            else:
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            with pool:
                tokens = sum(pool.map(encode_text, pieces)) - len(pieces) + len(texts)
    else:
        stream, hit = tokenize_corpus(
            str(corpus), "gpt2", 50256, cache, num_proc=1 if variant == "pipeline-1" else workers
        )
        assert not hit
        tokens = len(stream)
    seconds, after = time.perf_counter() - start, os.times()
    own = (after.user - before.user) + (after.system - before.system)
    children = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    print(json.dumps({"seconds": seconds, "own_cpu": own, "children_cpu": children, "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.workers)

    work = Path(tempfile.mkdtemp(prefix="tokenize-scaling-"))
    corpus = work / "corpus"
    corpus.mkdir()
    text = (resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    for i in range(args.files):  # distinct documents: nothing can reuse another's work
        (corpus / f"doc{i:04d}.txt").write_text(f"Document {i}.\n" + text, encoding="utf-8")
    mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for attempt in range(args.repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--workers", str(args.workers), "--child", variant, str(corpus),
                   str(work / f"cache-{variant}-{attempt}")]  # fmt: skip
            runs[variant].append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    # Raw processes cut the text every 1 MiB wherever it falls, which changes a few tokens at the cuts.
    pieced = ("raw-threads", "raw-processes")
    tokens = {r["tokens"] for v, rs in runs.items() for r in rs if v not in pieced}
    assert len(tokens) == 1, tokens
    tokens = tokens.pop()
    assert all(abs(r["tokens"] - tokens) < 100 for v in pieced for r in runs[v])
    n = args.workers
    print(f"{args.files} files, {mb:.1f} MB, {tokens:,} tokens; {os.cpu_count()} cores; best of {args.repeats}")
    print("| variant | workers | tokens/s | tokens/s per worker | vs raw, 1 process |")
    print("| --- | ---: | ---: | ---: | ---: |")
    best = {v: min(r["seconds"] for r in rs) for v, rs in runs.items()}
    base = tokens / best["raw-1-process"]
    for variant, count in zip(VARIANTS, (1, n, n, n, 1, n)):
        rate = tokens / best[variant]
        print(f"| {variant} | {count} | {rate:,.0f} | {rate / count:,.0f} | {rate / base:.2f}x |")
    print(
        "every run (s): " + "; ".join(f"{v} " + " ".join(f"{r['seconds']:.2f}" for r in rs) for v, rs in runs.items())
    )
    for variant in ("pipeline-n", "raw-processes"):
        own = min(r["own_cpu"] for r in runs[variant])
        workers_cpu = min(r["children_cpu"] for r in runs[variant])
        print(
            f"{variant}: its own process {own:.2f} CPU s, its workers {workers_cpu:.2f} CPU s: one process keeps "
            f"about {workers_cpu / max(own, 1e-9):.0f} workers busy"
        )


if __name__ == "__main__":
    main()
