"""Memory while streaming: heap (RssAnon) stays flat as the corpus grows, because windows come from a memory map.

    python benchmarks/data_memory.py [--base-copies 10] [--factor 10]

Builds two corpora from the bundled Tiny Shakespeare (`base-copies` files, and `factor` times as many), tokenizes
each into the Arrow cache, then in a fresh process per corpus streams one whole epoch of windows through the
trainer's loader and reports peak anonymous memory (heap) and file-backed memory (page cache of the map).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path


def rss_kib() -> dict[str, int]:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def stream_epoch(tokens_file: str) -> None:
    """Child process: one epoch of the trainer's loader over the token file; prints peak memory as JSON."""
    from accel_gpt.data import GlobalBatchSampler, TokenStream, WindowDataset, make_loader

    ds = WindowDataset(TokenStream(tokens_file), context_len=128, stride=128)
    sampler = GlobalBatchSampler(len(ds), batch_size=8, global_batch_size=8, seed=0)
    peak_anon = peak_file = 0
    start = time.perf_counter()
    for i, _ in enumerate(make_loader(ds, sampler)):
        if i % 256 == 0:
            mem = rss_kib()
            peak_anon, peak_file = max(peak_anon, mem["RssAnon"]), max(peak_file, mem["RssFile"])
    seconds = time.perf_counter() - start
    print(json.dumps({"windows": len(ds), "peak_rss_anon_mib": peak_anon / 1024, "peak_rss_file_mib": peak_file / 1024,
                      "windows_per_sec": len(ds) / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-copies", type=int, default=10)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return stream_epoch(args.child)

    from accel_gpt.data import tokenize_corpus

    source = Path(str(resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt"))
    work = Path(tempfile.mkdtemp(prefix="accel_gpt_mem_"))
    try:
        rows = []
        for copies in (args.base_copies, args.base_copies * args.factor):
            corpus = work / f"corpus{copies}"
            corpus.mkdir()
            for i in range(copies):
                (corpus / f"part{i:05d}.txt").symlink_to(source)
            stream, _ = tokenize_corpus(str(corpus), "gpt2", 50256, work / "cache")
            out = subprocess.run([sys.executable, __file__, "--child", str(stream.path)], capture_output=True,
                                 text=True, check=True)
            rows.append({"tokens": len(stream), **json.loads(out.stdout)})
        print("| corpus tokens | windows | peak heap (RssAnon) MiB | peak mapped file (RssFile) MiB | windows/s |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['tokens']:,} | {r['windows']:,} | {r['peak_rss_anon_mib']:.1f} | "
                  f"{r['peak_rss_file_mib']:.1f} | {r['windows_per_sec']:,.0f} |")
        ratio = rows[1]["peak_rss_anon_mib"] / rows[0]["peak_rss_anon_mib"]
        print(f"heap ratio {args.factor}x corpus / 1x corpus: {ratio:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
