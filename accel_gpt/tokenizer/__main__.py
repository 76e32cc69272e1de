"""python -m accel_gpt.tokenizer train: a byte-level BPE trained on your corpus, written to a folder that
`--tokenizer DIR` then trains, samples, evaluates and exports with.

    python -m accel_gpt.tokenizer train --data PATH --vocab_size N --out DIR [--pattern gpt2|gpt4] [--max_chars N]
    python -m accel_gpt.tokenizer train --dataset NAME [--dataset_config C] [--train_split S] --vocab_size N --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from accel_gpt.cli import CommandLineParser, run_command, summary
from accel_gpt.errors import UserError
from accel_gpt.tokenizer import MANIFEST_FILE, PATTERNS, TOKENIZER_FILE, get_tokenizer


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(prog="python -m accel_gpt.tokenizer", description=summary(__doc__))
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE on a corpus (needs the `tokenizers` package)")
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="training text, in any form train_data_path takes (its train files)")
    data.add_argument("--dataset", help="a Hugging Face dataset (local folder or in the local cache), streamed")
    train.add_argument("--dataset_config", help="the dataset's configuration name")
    train.add_argument("--train_split", default="train", help="the dataset split to train on (default: train)")
    train.add_argument("--text_column", default="text", help="the column or field that holds the text (default: text)")
    train.add_argument("--vocab_size", type=int, required=True, help="token ids, the end-of-text token included")
    train.add_argument("--out", required=True, help="the folder to write (refused if it holds a tokenizer)")
    train.add_argument(
        "--pattern", choices=list(PATTERNS), default="gpt2",
        help="how text is split before merging: gpt2 (GPT-2's, the default) or gpt4 (GPT-4's: digits in threes, "
        "no space before a word after punctuation)",
    )  # fmt: skip
    train.add_argument("--max_chars", type=int, help="read at most this many characters (default: all)")
    train.add_argument("--overwrite", action="store_true", help="replace a tokenizer in --out (moved aside first)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from accel_gpt.tokenizer.training import (
        MAX_VOCAB_SIZE,
        MIN_VOCAB_SIZE,
        compression,
        documents_of,
        train_bpe,
        write_tokenizer,
    )

    if not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {args.vocab_size}")
    if args.max_chars is not None and args.max_chars < 1:
        raise UserError(f"max_chars must be positive, got {args.max_chars}")
    if not args.out.strip():
        raise UserError("--out is empty: give the folder to write the tokenizer to")
    out = Path(args.out)
    existing = next(p for p in (out, *out.parents) if p.exists())  # checked before training, not after
    if not existing.is_dir():
        raise UserError(f"--out {out} is a file: give a folder" if existing == out else
                        f"--out {out} is under {existing}, a file: give a folder")  # fmt: skip
    found = [out / name for name in (TOKENIZER_FILE, MANIFEST_FILE, "tokenizer_config.json") if (out / name).exists()]
    if found and not args.overwrite:
        raise UserError(f"--out {out} already holds a tokenizer: give a new folder, or pass --overwrite")
    source, described = open_source(args)
    trained = train_bpe(documents_of(source), args.vocab_size, args.pattern, args.max_chars)
    if len(trained.ranks) + 1 < args.vocab_size:
        print(f"the corpus gave {len(trained.ranks) + 1:,} ids, fewer than vocab_size {args.vocab_size:,}: every "
              "merge it has", file=sys.stderr)  # fmt: skip
    trained_on = {**described, "characters": trained.characters, "documents": trained.documents}
    if found:  # --overwrite: the earlier tokenizer's files go aside, nothing is deleted
        from accel_gpt.export import set_aside

        set_aside(out, found)
    digest = write_tokenizer(out, trained.ranks, args.pattern, trained_on)
    print(
        f"trained a byte-level BPE of {len(trained.ranks) + 1:,} ids (pattern {args.pattern}) on "
        f"{trained.characters:,} characters in {trained.seconds:.1f} s: {out} (sha256 {digest[:12]})"
    )
    if trained.held_out:
        ours, gpt2 = (compression(t, trained.held_out) for t in (get_tokenizer(str(out)), get_tokenizer("gpt2")))
        print(
            f"held-out text ({sum(map(len, trained.held_out)):,} characters): {ours['tokens_per_char']:.2f} tokens "
            f"per character, {ours['bytes_per_token']:.2f} bytes per token (GPT-2: {gpt2['tokens_per_char']:.2f}, "
            f"{gpt2['bytes_per_token']:.2f})"
        )


def open_source(args):
    """The training text's source (`data.streaming`'s, read document by document) and what the manifest says of it."""
    from accel_gpt.data.mixture import is_mixture
    from accel_gpt.data.sources import one_format, resolve_data
    from accel_gpt.data.streaming import FileSource, open_dataset_source

    if args.dataset is not None:
        source = open_dataset_source(args.dataset, args.dataset_config, args.train_split, args.text_column, 1)
        return source, {"dataset": args.dataset, "dataset_config": args.dataset_config, "split": args.train_split}
    if is_mixture(args.data):
        raise UserError(
            f"--data {args.data} is a mixture: a tokenizer trains on one data path (a folder or glob of every "
            "source's files, in one format)"
        )
    files = resolve_data(args.data, None).train
    one_format(f"train data: {args.data}", files)  # as training refuses it: --data takes what train_data_path takes
    return FileSource(files, args.text_column), {"data": args.data, "files": len(files)}


if __name__ == "__main__":
    run_command(main)
