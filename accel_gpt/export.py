"""Export a checkpoint as a Hugging Face GPT-2 folder:

    python -m accel_gpt.export --checkpoint RUN_OR_CHECKPOINT_DIR [--step N] --out HF_DIR

The folder loads with `transformers.GPT2LMHeadModel.from_pretrained(HF_DIR)` and gives the same logits.
"""

from __future__ import annotations

from pathlib import Path

from accel_gpt.checkpoint import MANIFEST, list_checkpoints
from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command
from accel_gpt.errors import UserError
from accel_gpt.hf import export_to_hf
from accel_gpt.inference import load_model


def refuse_run_folder(out: Path) -> None:
    """Export writes config.json and model.safetensors: never into a checkpoint (they would replace its own), nor
    into a run directory or the folder of its checkpoints (a folder of its own inside a run directory is fine)."""
    if checkpoint := next((f for f in (out, *out.resolve().parents) if (f / MANIFEST).is_file()), None):
        raise UserError(f"--out {out} is inside checkpoint {checkpoint}: export into a folder of its own")
    if (out / "metrics.jsonl").is_file() or (out / "config.yaml").is_file() or list_checkpoints(out):
        raise UserError(f"--out {out} holds a run or its checkpoints: export into a folder of its own")


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="python -m accel_gpt.export", description=__doc__.splitlines()[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for config.json + model.safetensors")
    args = parser.parse_args(argv)
    refuse_run_folder(Path(args.out))
    out = export_to_hf(load_model(args.checkpoint, step=args.step), args.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors (GPT2LMHeadModel)")


if __name__ == "__main__":
    run_command(main)
