"""Score a checkpoint on any corpus: mean next-token loss and perplexity, printed as one JSON line (which files
were scored goes to stderr):

python -m accel_gpt.evaluate --checkpoint RUN_OR_CHECKPOINT_DIR --data PATH [--split NAME] [--stride N] [--batch_size N]
"""

from __future__ import annotations

import json
import math
import sys

from accel_gpt.cache import DEFAULT_DIR as DEFAULT_CACHE_DIR
from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command
from accel_gpt.inference import default_stride, open_checkpoint, resolve_device, scored_corpus, sliding_window_loss


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="python -m accel_gpt.evaluate", description=__doc__.splitlines()[0])
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="text to score, in any form training takes: a .txt/.jsonl/"
        ".parquet file, a folder written by datasets' save_to_disk, a directory, a glob, or a "
        "bundled corpus name",
    )
    parser.add_argument(
        "--split",
        help="of a folder laid out in hub splits (train-*.parquet, validation-*.jsonl, ...), the split to score "
        "(default: validation; the others are never scored with it)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        help="tokens between window starts, 1..context_len; each token is "
        "scored once, so a shorter stride gives each more context (default: context_len / 2, as "
        "accel_gpt.analysis.perplexity)",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument(
        "--text_column", help="the column or .jsonl field holding the text (default: the one the checkpoint trained on)"
    )
    parser.add_argument("--data_cache_dir", help=f"where tokenized corpora are cached (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    checkpoint = open_checkpoint(args.checkpoint, args.step, resolve_device(args.device))
    settings = checkpoint.train_config
    # The corpus is tokenized as the checkpoint's run tokenized its own: same tokenizer, same end-of-text id.
    column = args.text_column or settings.get("text_column", "text")
    corpus = scored_corpus(
        args.data, settings.get("tokenizer", "gpt2"), settings.get("special_token_id"), args.data_cache_dir, column,
        args.split,
    )  # fmt: skip
    print(f"evaluate: {corpus.note}", file=sys.stderr, flush=True)
    context = checkpoint.model.config.context_len
    stride = default_stride(checkpoint.model) if args.stride is None else args.stride
    loss, scored = sliding_window_loss(checkpoint.model, corpus.tokens, stride, args.batch_size)
    print(
        json.dumps(
            {
                "checkpoint": str(checkpoint.path),
                "data": args.data,
                "split": corpus.split,
                "files": len(corpus.files),
                "tokens": scored,
                "context_len": context,
                "stride": stride,
                "loss": loss,
                "perplexity": math.exp(loss),
            }
        )
    )


if __name__ == "__main__":
    run_command(main)
