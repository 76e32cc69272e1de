"""Export a checkpoint as a Hugging Face GPT-2 folder:

    python -m accel_gpt.export --checkpoint RUN_OR_CHECKPOINT_DIR [--step N] --out HF_DIR

The folder loads with `transformers.GPT2LMHeadModel.from_pretrained(HF_DIR)` and gives the same logits.
"""

from __future__ import annotations

from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command
from accel_gpt.hf import export_to_hf
from accel_gpt.inference import load_model


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="python -m accel_gpt.export", description=__doc__.splitlines()[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for config.json + model.safetensors")
    args = parser.parse_args(argv)
    out = export_to_hf(load_model(args.checkpoint, step=args.step), args.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors (GPT2LMHeadModel)")


if __name__ == "__main__":
    run_command(main)
