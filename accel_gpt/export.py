"""Export a checkpoint as a Hugging Face GPT-2 folder:

    python -m accel_gpt.export --checkpoint RUN_OR_CHECKPOINT_DIR [--step N] --out HF_DIR [--overwrite]

The folder loads with `transformers.GPT2LMHeadModel.from_pretrained(HF_DIR)` and gives the same logits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from accel_gpt.checkpoint import MANIFEST, list_checkpoints, overwritten_name
from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command, summary
from accel_gpt.data.sources import DATASET_DICT_FILE, DATASET_FILES, is_corpus_file
from accel_gpt.errors import UserError
from accel_gpt.hf import EXPORT_FILES, export_to_hf
from accel_gpt.inference import open_checkpoint


def check_out_folder(out: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier export in `out` that this one replaces (refused unless `overwrite`). Never a
    checkpoint (its own files would be replaced), a run directory or the folder of its checkpoints, a folder saved
    by `datasets`, or a folder holding corpus files, whose data path config.json would join (a folder of its own
    inside a run is fine)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: export into a folder")
    if checkpoint := next((f for f in (out, *out.resolve().parents) if (f / MANIFEST).is_file()), None):
        raise UserError(f"--out {out} is inside checkpoint {checkpoint}: export into a folder of its own")
    if (out / "metrics.jsonl").is_file() or (out / "config.yaml").is_file() or list_checkpoints(out):
        raise UserError(f"--out {out} holds a run or its checkpoints: export into a folder of its own")
    if (out / DATASET_DICT_FILE).is_file() or all((out / name).is_file() for name in DATASET_FILES):
        raise UserError(f"--out {out} holds a dataset saved by `datasets`: export into a folder of its own")
    if corpus := next(corpus_files(out), None):
        raise UserError(
            f"--out {out} holds corpus files ({corpus}): export's config.json would join them as a JSON file of the "
            "corpus; export into a folder of its own"
        )
    found = [out / name for name in EXPORT_FILES if (out / name).exists()]
    if found and not overwrite:
        raise UserError(
            f"--out {out} already holds {', '.join(p.name for p in found)}: export into a new folder, or pass "
            "--overwrite (moves them aside, deletes nothing)"
        )
    return found


def corpus_files(folder: Path):
    """The files below `folder` that a data path would read as corpus text (.txt, .jsonl, .json, .parquet, or
    compressed), export's own files and earlier exports' set-aside folders excepted; lazily, so the first one
    found ends the search."""
    for root, folders, names in os.walk(folder):
        folders[:] = [f for f in folders if not f.startswith(("overwritten-", "."))]
        for name in names:
            if not name.startswith(".") and name not in EXPORT_FILES and is_corpus_file(Path(root, name)):
                yield Path(root, name)


def set_aside(out: Path, files: list[Path]) -> Path:
    """Move an earlier export's files into `out/overwritten-<time>/`, deleting nothing."""
    dest = out / overwritten_name(out)
    try:
        dest.mkdir()
        for path in files:
            os.replace(path, dest / path.name)
    except OSError as err:
        raise UserError(f"could not move the earlier export in {out} aside: {err.strerror or err}") from None
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="python -m accel_gpt.export", description=summary(__doc__))
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, help=f"output folder for {', '.join(EXPORT_FILES)}")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out: its files are moved into --out/overwritten-<time>/, never deleted",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    earlier = check_out_folder(out, args.overwrite)
    checkpoint = open_checkpoint(args.checkpoint, args.step)  # before anything moves: a bad one changes nothing
    if earlier:
        print(f"moved the earlier export's {', '.join(p.name for p in earlier)} to {set_aside(out, earlier)}")
    tokenizer = checkpoint.tokenizer
    export_to_hf(checkpoint.model, out, tokenizer)
    written = [name for name in EXPORT_FILES if (out / name).exists()]
    print(f"wrote {', '.join(written)} to {out} (GPT2LMHeadModel{', and its tokenizer' if len(written) > 2 else ''})")
    if len(written) == 2:
        print(f"no tokenizer files: the {tokenizer} tokenizer has no Hugging Face form yet", file=sys.stderr)
    if checkpoint.train_config.get("document_mask"):  # GPT2LMHeadModel has no block-causal mask to carry it in
        print("note: trained with --document_mask: GPT2LMHeadModel attends across <|endoftext|>, so after one its "
              "logits differ from accel_gpt's (within a document they are the same)", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    run_command(main)
