"""Tokenizing one large .txt file: peak memory at two file sizes, and what the content-keyed cache costs.

    python benchmarks/large_file.py [--sizes-mb 50 500] [--num-proc 2]

For each size, builds one .txt file (Tiny Shakespeare repeated, each copy headed by its number) and, in a fresh
process: warms up (imports, tokenizer, a tiny corpus), restarts the kernel's peak-RSS counter, then
1. tokenizes the file into an empty cache (`tokenize_corpus`) and reads the process's peak RSS (VmHWM);
2. times xxh3-128 over the file, the hash that keys the cache, against that tokenization;
3. times a second `tokenize_corpus` call, a cache hit (hash the file, check the token file's size, hash and count).
Then tokenizes the smallest file whole in one `encode_ordinary` call and counts the tokens that differ from the
pieces (expected 0: pieces end where GPT-2's split pattern starts a pre-token).
Goal: peak RSS at the largest size within 10% of the smallest.
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


def status_mib(key: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024


def measure(corpus: str, cache: str, num_proc: int) -> None:
    """Child process: tokenize, hash and hit one corpus; prints the measurements as JSON."""
    from accel_gpt.data.cache import file_digest
    from accel_gpt.data.tokens import tokenize_corpus

    tokenize_corpus("the-verdict", "gpt2", 50256, cache, num_proc=num_proc)  # warm-up: imports, tokenizer, threads
    baseline = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) now starts from here
    start = time.perf_counter()
    stream, hit = tokenize_corpus(corpus, "gpt2", 50256, cache, num_proc=num_proc)
    tokenize_s = time.perf_counter() - start
    assert not hit
    peak = status_mib("VmHWM")
    start = time.perf_counter()
    file_digest(Path(corpus))
    hash_s = time.perf_counter() - start
    start = time.perf_counter()
    assert tokenize_corpus(corpus, "gpt2", 50256, cache, num_proc=num_proc)[1]
    hit_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "tokens": len(stream),
                "baseline_mib": baseline,
                "peak_mib": peak,
                "tokenize_s": tokenize_s,
                "hash_s": hash_s,
                "hit_s": hit_s,
                "tokens_file": str(stream.paths[0]),
            }
        )
    )


def differing_tokens(corpus: Path, tokens_file: str) -> tuple[int, int]:
    """(tokens that differ between the cached pieces and the whole file tokenized at once, tokens)."""
    import difflib

    from accel_gpt.data.tokens import TokenStream
    from accel_gpt.tokenizer import get_tokenizer

    whole = get_tokenizer("gpt2").encode_ordinary(corpus.read_text(encoding="utf-8")) + [50256]
    stream = TokenStream([tokens_file])
    pieces = stream.read(0, len(stream)).tolist()
    if pieces == whole:
        return 0, len(whole)
    opcodes = difflib.SequenceMatcher(a=whole, b=pieces, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in opcodes if tag != "equal"), len(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(*args.child, num_proc=args.num_proc)

    source = Path(str(resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt")).read_text(encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="accel_gpt_large_"))
    try:
        rows = []
        for mb in args.sizes_mb:
            corpus = work / f"one_{mb}mb.txt"
            with open(corpus, "w", encoding="utf-8") as f:
                copy = 0
                while f.tell() < mb * 1_000_000:
                    f.write(f"Copy {copy}.\n{source}")
                    copy += 1
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(corpus),
                str(work / f"cache{mb}"),
                "--num-proc",
                str(args.num_proc),
            ]
            result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            rows.append({"mb": corpus.stat().st_size / 1e6, "corpus": corpus, **result})
        print(f"one .txt file, {args.num_proc} tokenizer threads, each size in a fresh process:")
        print(
            "| file | tokens | peak RSS MiB | above warm-up MiB | tokenize s | xxh3 of the file s "
            "| hash / tokenize | cache hit s |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(
                f"| {r['mb']:,.0f} MB | {r['tokens']:,} | {r['peak_mib']:,.0f} "
                f"| {r['peak_mib'] - r['baseline_mib']:,.1f} | {r['tokenize_s']:.1f} | {r['hash_s']:.3f} "
                f"| {r['hash_s'] / r['tokenize_s']:.2%} | {r['hit_s']:.2f} |"
            )
        ratio = rows[-1]["peak_mib"] / rows[0]["peak_mib"]
        print(f"peak RSS {rows[-1]['mb']:,.0f} MB / {rows[0]['mb']:,.0f} MB: {ratio:.3f} (goal <= 1.10)")
        differing, total = differing_tokens(rows[0]["corpus"], rows[0]["tokens_file"])
        print(f"{rows[0]['mb']:,.0f} MB file in pieces vs whole: {differing} of {total:,} tokens differ")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
