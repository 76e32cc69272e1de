"""Task evaluation: multiple-choice and completion tasks from local JSONL files, scored as lm-evaluation-harness
scores them (the log-likelihood of each continuation after its context), for `evaluate --tasks` and training's
`--eval_tasks`.

A file's form is read from its fields (docs/evaluation.md): HellaSwag as published (`ctx` or `ctx_a`/`ctx_b`,
`endings`, `label`, `activity_label`), generic multiple choice (`query`, `choices`, `gold`), LAMBADA as published
(`text`: the last word is the target) and generic completion (`context`, `continuation`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel

# Examples whose requests go through the model together. Fixed, so that a group's batch, hence each example's
# numbers to the last bit, is the same whether one process scores the task or several share it out.
EXAMPLES_PER_GROUP = 8

MULTIPLE_CHOICE, COMPLETION = "multiple_choice", "completion"
FORMS = {  # the fields that make each form, checked in this order
    "hellaswag": ({"endings", "label"}, MULTIPLE_CHOICE),
    "choices": ({"query", "choices", "gold"}, MULTIPLE_CHOICE),
    "context": ({"context", "continuation"}, COMPLETION),
    "lambada": ({"text"}, COMPLETION),
}


@dataclass(frozen=True)
class Example:
    context: str
    continuations: tuple[str, ...]  # multiple choice: target delimiter " " + each choice; completion: the target
    gold: int  # the right continuation's index (0 for a completion)
    choice_chars: tuple[int, ...]  # each choice's length in characters, without the delimiter: acc_norm divides by it


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    form: str  # a key of FORMS
    examples: list[Example]

    @property
    def kind(self) -> str:
        return FORMS[self.form][1]


# ----------------------------------------------------------------------------------------------- task files
def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's `hellaswag` preprocessing: WikiHow's bracketed artefacts out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _example(form: str, row: dict) -> Example:
    """One line's example; KeyError/TypeError/ValueError for fields of the wrong kind, which the caller names."""
    if form == "hellaswag":
        ctx = _text(row["ctx_a"]) + " " + _text(row["ctx_b"]).capitalize() if "ctx_a" in row else _text(row["ctx"])
        query = hellaswag_preprocess(_text(row["activity_label"]) + ": " + ctx)
        choices = [hellaswag_preprocess(_text(ending)) for ending in _list(row["endings"])]
        label = row["label"]  # a string in the published files ("3"); empty in the unlabelled test split
        gold = int(label) if isinstance(label, str) and label.strip().isdigit() else label
    elif form == "choices":
        query, choices, gold = row["query"], _list(row["choices"]), row["gold"]
    elif form == "context":
        return Example(_text(row["context"]), (_text(row["continuation"]),), 0, (len(row["continuation"]),))
    else:  # lambada: the last word after the rest, with its space, as the harness's lambada_openai
        words = _text(row["text"]).split(" ")
        if len(words) < 2:
            raise ValueError("'text' needs at least two words: the last one is the target")
        return Example(" ".join(words[:-1]), (" " + words[-1],), 0, (len(words[-1]) + 1,))
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError(f"the right answer {gold!r} is not an index of its {len(choices)} choices")
    if len(choices) < 2:
        raise ValueError(f"a multiple-choice example needs two choices or more, it has {len(choices)}")
    texts = [_text(choice) for choice in choices]
    return Example(_text(query), tuple(" " + t for t in texts), gold, tuple(len(t) for t in texts))


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _list(value) -> list:
    if not isinstance(value, list):
        raise TypeError(f"{value!r} is not a list of choices")
    return value


def form_of(row: dict) -> str | None:
    return next((form for form, (fields, _) in FORMS.items() if fields <= row.keys()), None)


def load_task(spec: str) -> Task:
    """`PATH` or `NAME=PATH`: a JSONL file of one task (its name: the file's stem, or NAME). Any line that is not
    an example of the file's form is one UserError naming the file and the line."""
    name, _, path_text = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    path = Path(path_text).expanduser()
    name = name or path.stem
    if not name or not path_text:
        raise UserError(f"task {spec!r}: give a file, or NAME=FILE")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"task file {path} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"task file {path} is not UTF-8 ({err.reason} at byte offset {err.start})") from None
    form, examples = None, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path} line {number} is not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        if form is None:
            form = form_of(row)
            if form is None:
                known = "; ".join(", ".join(sorted(fields)) for fields, _ in FORMS.values())
                raise UserError(
                    f"{path} line {number}: no task form has the fields {', '.join(sorted(row)) or '(none)'} "
                    f"(the forms: {known}; see docs/evaluation.md)"
                )
        try:
            examples.append(_example(form, row))
        except KeyError as err:
            raise UserError(f"{path} line {number} has no {err.args[0]!r} (a {form} task's field)") from None
        except (TypeError, ValueError) as err:
            raise UserError(f"{path} line {number}: {err}") from None
    if not examples:
        raise UserError(f"task file {path} holds no examples")
    return Task(name, path, form, examples)


def load_tasks(specs: str) -> list[Task]:
    """Comma-separated task files (`PATH` or `NAME=PATH` each); two tasks of one name are refused."""
    tasks = [load_task(spec.strip()) for spec in specs.split(",") if spec.strip()]
    names = [task.name for task in tasks]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise UserError(f"two tasks are named {twice!r}: name them apart with NAME=PATH")
    if not tasks:
        raise UserError("no task given: pass task files, PATH[,PATH...]")
    return tasks


# ----------------------------------------------------------------------------------------------- scoring
def encode_pair(tokenizer: tiktoken.Encoding, context: str, continuation: str, eot_id: int) -> tuple[list, list]:
    """(context ids, continuation ids) as the harness makes them: the context's trailing spaces move to the
    continuation, the continuation's ids are those of the whole text after the context's; an empty context is the
    end-of-text token."""
    if not context:
        return [eot_id], tokenizer.encode_ordinary(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode_ordinary(context + continuation), tokenizer.encode_ordinary(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def loglikelihoods(model: GPTModel, requests: list[tuple[list, list]]) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether every continuation token is the greedy argmax) for each
    (context ids, continuation ids), in one forward pass of the requests right-padded to the longest. A context
    longer than the model's window is cut from the left, as the harness does."""
    window, device = model.config.context_len, next(model.parameters()).device
    inputs, spans = [], []
    for context, continuation in requests:
        if len(continuation) > window:
            raise UserError(f"a continuation of {len(continuation)} tokens is longer than the model's context {window}")
        whole = (context + continuation)[-(window + 1) :]
        inputs.append(whole[:-1])
        spans.append((len(whole) - 1 - len(continuation), continuation))
    batch = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
    for row, ids in enumerate(inputs):
        batch[row, : len(ids)] = torch.tensor(ids)
    hidden = model.hidden_states(batch.to(device))
    rows = torch.cat([hidden[row, start : start + len(targets)] for row, (start, targets) in enumerate(spans)])
    logits = model.soft_cap(model.out_head(rows)[:, : model.config.vocabulary_size]).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor([t for _, continuation in spans for t in continuation], device=device)
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == targets
    results, at = [], 0
    for _, continuation in spans:
        end = at + len(continuation)
        results.append((chosen[at:end].sum().item(), bool(greedy[at:end].all())))
        at = end
    return results


@dataclass
class Counts:
    """What a task's examples add up to, summed over processes: examples, right answers (by the sum, and by the sum
    per character), and the log-likelihoods of completions (their sum and sum of squares, for the perplexity and its
    standard error)."""

    examples: float = 0.0
    correct: float = 0.0
    correct_norm: float = 0.0
    loglikelihood: float = 0.0
    loglikelihood_sq: float = 0.0

    def as_list(self) -> list[float]:
        return [self.examples, self.correct, self.correct_norm, self.loglikelihood, self.loglikelihood_sq]


def score_groups(
    model: GPTModel, task: Task, tokenizer: tiktoken.Encoding, eot_id: int, groups: list[list[int]], rounds: int
) -> Counts:
    """The counts of the examples in `groups` (each group's every choice in one forward pass), in `rounds` passes:
    past the last group the first is run again and not counted, so that every process makes as many passes (under
    FSDP each is a collective)."""
    counts = Counts()
    was_training = model.training
    model.eval()
    for round_ in range(rounds):
        group = [task.examples[i] for i in (groups[round_] if round_ < len(groups) else groups[0] if groups else [0])]
        requests = [encode_pair(tokenizer, ex.context, c, eot_id) for ex in group for c in ex.continuations]
        results = iter(loglikelihoods(model, requests))
        for example in group:
            scored = [next(results) for _ in example.continuations]
            if round_ < len(groups):
                add_example(counts, example, scored, task.kind)
    model.train(was_training)
    return counts


def add_example(counts: Counts, example: Example, scored: list[tuple[float, bool]], kind: str) -> None:
    counts.examples += 1
    if kind == MULTIPLE_CHOICE:
        lls = [ll for ll, _ in scored]
        counts.correct += float(max(range(len(lls)), key=lls.__getitem__) == example.gold)
        normed = [ll / chars for ll, chars in zip(lls, example.choice_chars)]
        counts.correct_norm += float(max(range(len(normed)), key=normed.__getitem__) == example.gold)
    else:
        ll, greedy = scored[0]
        counts.correct += float(greedy)
        counts.loglikelihood += ll
        counts.loglikelihood_sq += ll * ll


def task_groups(task: Task, limit: int | None) -> list[list[int]]:
    """The task's first `limit` examples in groups of EXAMPLES_PER_GROUP, the unit dealt out to processes: a
    group's batch, hence each example's numbers, is then the same at any number of processes."""
    count = len(task.examples) if limit is None else min(limit, len(task.examples))
    return [list(range(i, min(i + EXAMPLES_PER_GROUP, count))) for i in range(0, count, EXAMPLES_PER_GROUP)]


def metrics(task: Task, counts: Counts) -> dict:
    """acc and acc_norm (multiple choice) or acc and perplexity (completion), each with its standard error, as the
    harness reports them (the sample standard deviation over examples / sqrt(examples); None for one example)."""
    n = counts.examples
    out = {"task": task.name, "examples": int(n)}

    def mean_and_stderr(right: float) -> tuple[float, float]:
        mean = right / n  # of values 0 and 1, whose sample variance is mean (1 - mean) n / (n - 1)
        return mean, math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else None

    out["acc"], out["acc_stderr"] = mean_and_stderr(counts.correct)
    if task.kind == MULTIPLE_CHOICE:
        out["acc_norm"], out["acc_norm_stderr"] = mean_and_stderr(counts.correct_norm)
    else:
        mean_ll = counts.loglikelihood / n
        out["perplexity"] = math.exp(-mean_ll)
        out["perplexity_stderr"] = None
        if n > 1:  # the delta method: d exp(-m) = exp(-m) dm
            variance = max(0.0, counts.loglikelihood_sq / n - mean_ll**2) * n / (n - 1)
            out["perplexity_stderr"] = out["perplexity"] * math.sqrt(variance / n)
    return out


def evaluate_task(
    model: GPTModel, task: Task, tokenizer: tiktoken.Encoding, eot_id: int, limit: int | None = None,
    rank: int = 0, world_size: int = 1, reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict:  # fmt: skip
    """`metrics` of the task's first `limit` examples. With several processes each scores every `world_size`-th group
    from its `rank` on, and `reduce` sums the counts over them."""
    groups = task_groups(task, limit)
    counts = score_groups(model, task, tokenizer, eot_id, groups[rank::world_size], -(-len(groups) // world_size))
    if reduce is not None:
        counts = Counts(*reduce(counts.as_list()))
    return metrics(task, counts)
