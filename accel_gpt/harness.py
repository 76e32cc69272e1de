"""lm-evaluation-harness for accel_gpt checkpoints, any model option included: importing this module registers an
lm-eval model named `accel_gpt`, and `python -m accel_gpt.harness` runs lm-eval's tasks on a checkpoint.

    python -m accel_gpt.harness --checkpoint RUN --tasks hellaswag[,lambada_openai...] [--include_path DIR]
        [--limit N] [--output_path FILE] [--batch_size N] [--device cpu|cuda]

Needs the `eval` extra (`pip install -e ".[eval]"`: lm-eval >= 0.4). Scoring goes through `accel_gpt.tasks`, the
code behind `evaluate --tasks` and `--eval_tasks`, so all three give the same log-likelihoods.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command, summary
from accel_gpt.errors import UserError
from accel_gpt.inference import open_checkpoint, resolve_device
from accel_gpt.model import stream_tokens
from accel_gpt.tasks import loglikelihoods
from accel_gpt.tokenizer import get_tokenizer

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models ("hf", ...), registered before ours, as its CLI does
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the CLI says what to install; importing this module without lm-eval is an ImportError
    if __name__ != "__main__":
        raise
    TemplateLM = None


def lm_eval_missing() -> UserError:
    return UserError("accel_gpt.harness needs lm-evaluation-harness: pip install -e '.[eval]' (lm-eval >= 0.4)")


if TemplateLM is not None:

    @register_model("accel_gpt")
    class AccelGPT(TemplateLM):
        """An accel_gpt checkpoint as an lm-eval model. model_args: `checkpoint` (a run directory or checkpoint),
        `step`, `device` (default cuda when available), `batch_size` (requests per forward pass, default 16)."""

        def __init__(self, checkpoint: str, step=None, device=None, batch_size=16, max_gen_toks=256, **kwargs):
            super().__init__()
            loaded = open_checkpoint(checkpoint, None if step in (None, "") else int(step), resolve_device(device))
            self.model, self.checkpoint = loaded.model, loaded.path
            self.tokenizer = get_tokenizer(loaded.tokenizer)
            eot = loaded.train_config.get("special_token_id")
            self._eot = self.tokenizer.eot_token if eot is None else eot
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is not searched for
            self.max_gen_toks = int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return self._eot

        @property
        def max_length(self) -> int:
            return self.model.config.context_len

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tokenizer.encode_ordinary(string)

        def tok_decode(self, tokens) -> str:
            return self.tokenizer.decode(list(tokens))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """(log-likelihood, greedy) of each ((context, continuation), context ids, continuation ids), by the
            scoring of `evaluate --tasks`, `batch_size` requests per forward pass."""
            pairs = [(context, continuation) for _, context, continuation in requests]
            results = []
            for first in range(0, len(pairs), self.batch_size):
                results += loglikelihoods(self.model, pairs[first : first + self.batch_size])
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Each text's whole log-likelihood, in disjoint windows of the model's context (the harness's own
            windowing, the end-of-text token before the first)."""
            totals = []
            for (text,) in (request.args for request in requests):
                windows = get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1,
                )  # fmt: skip
                pairs = [(None, *make_disjoint_window(window)) for window in windows]
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(pairs)))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled, with `temperature` > 0) continuations with the KV cache, cut at the first stop
            string (`until`, default the end-of-text token's text)."""
            outputs = []
            device = next(self.model.parameters()).device
            for context, options in (request.args for request in requests):
                until = options.get("until") or [self.tokenizer.decode([self._eot])]
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(options.get("temperature", 0.0)) if options.get("do_sample", True) else 0.0
                limit = int(options.get("max_gen_toks", self.max_gen_toks))
                ids = self.tok_encode(context)[-(self.max_length - 1) :] or [self._eot]
                new_ids, text = [], ""
                for next_id in stream_tokens(
                    self.model, torch.tensor([ids], device=device), limit, temperature=temperature, eos_id=self._eot
                ):
                    new_ids.append(next_id.item())
                    text = self.tokenizer.decode(new_ids)  # whole: a character may span tokens
                    if any(stop in text for stop in until):
                        break
                outputs.append(min((text.split(stop)[0] for stop in until), key=len))
            return outputs


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="python -m accel_gpt.harness", description=summary(__doc__))
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--tasks", required=True, help="lm-eval task names, T[,T...] (hub tasks need their data cached)"
    )
    parser.add_argument("--include_path", help="a folder of task YAMLs of your own (local data files)")
    parser.add_argument("--limit", type=int, help="score each task's first N examples (default: all)")
    parser.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: the task's)")
    parser.add_argument("--batch_size", type=int, default=16, help="requests per forward pass (default: 16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--output_path", help="write lm-eval's results JSON here")
    args = parser.parse_args(argv)
    if TemplateLM is None:
        raise lm_eval_missing()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include_path {args.include_path} is not a folder of task YAMLs")
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    manager = TaskManager(include_path=args.include_path, include_defaults=False) if args.include_path else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # indexing lm-eval's ~15,000 tasks takes seconds
        manager = TaskManager(include_path=args.include_path)
    if unknown := [name for name in names if name not in manager.all_tasks]:
        raise UserError(f"lm-eval knows no task {unknown[0]!r} (see `lm-eval ls tasks`, or pass --include_path)")
    model_args = {
        "checkpoint": args.checkpoint,
        "step": args.step,
        "device": args.device,
        "batch_size": args.batch_size,
    }
    results = lm_eval.simple_evaluate(
        model="accel_gpt", model_args=model_args, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=manager,
    )  # fmt: skip
    print(make_table(results))
    if args.output_path is not None:
        out = {key: results[key] for key in ("results", "configs", "versions", "n-shot", "config") if key in results}
        Path(args.output_path).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
        print(f"wrote {args.output_path}", file=sys.stderr)


if __name__ == "__main__":
    run_command(main)
