"""A training run's data: its data paths (or dataset) resolved on every rank, then tokenized once for the whole
cluster, the machines sharing the shards out, and opened as training and validation windows; or, streaming, the
stream of training batches and the fixed slices that evaluation reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object

from accel_gpt.data.cache import TOKENS
from accel_gpt.data.sources import DataFiles, load_dataset_splits, resolve_data
from accel_gpt.data.streaming import (
    FileSource,
    ReaderDataset,
    Readers,
    Source,
    StreamBatches,
    open_dataset_source,
    read_slice,
)
from accel_gpt.data.tokens import CANCEL, Corpus, TokenStream, build_shards, open_corpus, plan_corpus, share_out
from accel_gpt.data.windows import WindowDataset
from accel_gpt.errors import UserError
from accel_gpt.launch import agree, agree_when_done
from accel_gpt.plan import RunPlan


def data_files(plan: RunPlan, accelerator: Accelerator) -> DataFiles:
    """The run's training and validation files. Paths are resolved on every rank, so a bad one stops them all; a
    dataset is prepared in `datasets`' cache by one rank per machine first (its errors, too, reach every rank),
    and the others then load what it prepared."""
    cfg = plan.cfg
    if cfg.dataset is None:
        return resolve_data(cfg.train_data_path, cfg.val_data_path)

    def load() -> DataFiles:
        return load_dataset_splits(cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.val_split)

    prepared = agree_when_done(accelerator, lambda: load() if accelerator.is_local_main_process else None)
    return prepared[accelerator.process_index] if accelerator.is_local_main_process else load()


def tokenize_once(corpora: list[Corpus], plan: RunPlan, accelerator: Accelerator) -> list[dict[int, Path]]:
    """Every shard of `corpora` tokenized once for the whole cluster; returns each corpus's cache entries.

    The machines share the shards out by size, and each machine's first process tokenizes its share on all of that
    machine's cores while the machine's other processes wait. Where the cache directory is not shared, a machine
    then tokenizes the shards it cannot see itself; if its files give another cache key, the machines hold
    different data, and the run stops saying so."""
    cfg, local_main = plan.cfg, accelerator.is_local_main_process
    seen = gather_object([(local_main, [corpus.sizes for corpus in corpora])])  # every rank's shards, by size
    if differs := next((rank for rank, (_, sizes) in enumerate(seen) if sizes != seen[0][1]), None):
        shards = [
            f"{sum(map(len, sizes))} shards of {sum(map(sum, sizes)):,} bytes" for _, sizes in (seen[0], seen[differs])
        ]
        raise UserError(
            f"the data differs between machines: process 0 sees {shards[0]}, process {differs} {shards[1]}; give "
            "every machine the same files"
        )
    machines = [rank for rank, (first, _) in enumerate(seen) if first]
    work = [(c, i) for c, corpus in enumerate(corpora) for i in range(len(corpus.shards))]
    owner = share_out([corpora[c].sizes[i] for c, i in work], len(machines))
    cache_dir = cfg.token_cache_dir()  # every machine's own (the same folder where it is shared)

    def build(items: list[tuple[int, int]], where: str) -> list[dict[int, str]]:
        """The cache entries' names: the same content has the same name in every machine's cache."""
        entries = []
        for c, corpus in enumerate(corpora):
            built = build_shards(corpus, [i for cc, i in items if cc == c], cache_dir, cfg.num_proc)
            if built.tokenized:
                print(built.line(corpus) + where, flush=True)
            entries.append({i: entry.name for i, entry in built.entries.items()})
        return entries

    me = machines.index(accelerator.process_index) if local_main else -1
    where = f" (machine {me + 1} of {len(machines)})" if len(machines) > 1 else ""
    mine = [item for item, m in zip(work, owner) if m == me]
    names: list[dict[int, str]] = [{} for _ in corpora]
    for built_by_one in agree_when_done(accelerator, lambda: build(mine, where) if local_main else None, CANCEL):
        for corpus_names, found in zip(names, built_by_one or []):  # None from the processes that waited
            corpus_names.update(found)
    entries = [{i: cache_dir / name for i, name in found.items()} for found in names]
    if len(machines) == 1:
        return entries

    def build_unseen() -> None:
        unseen = [(c, i) for c, i in work if not (entries[c][i] / TOKENS).exists()]
        for c, found in enumerate(build(unseen, f"{where}: not in this machine's cache")):
            for i, entry in found.items():
                if entry != names[c][i]:
                    files = ", ".join(str(f) for f in corpora[c].shards[i][:2])
                    raise UserError(
                        f"{corpora[c].role} data differs between machines: {files} has other content on machine "
                        f"{me + 1} than where it was tokenized; give every machine the same files"
                    )

    agree_when_done(accelerator, lambda: build_unseen() if local_main else None, CANCEL)
    return entries


def load_token_streams(plan: RunPlan, accelerator: Accelerator) -> tuple[TokenStream, TokenStream]:
    """The run's training and validation tokens (without validation data: the last val_fraction of training's)."""
    cfg = plan.cfg
    files = data_files(plan, accelerator)
    if files.note and accelerator.is_main_process:
        print(files.note, flush=True)
    train_spec = cfg.dataset or cfg.train_data_path
    roles = [("train", train_spec, files.train)]
    if files.validation is not None:
        roles.append(("validation", cfg.val_data_path or train_spec, files.validation))
    corpora = [
        plan_corpus(spec, cfg.tokenizer, plan.eot_id, role, cfg.text_column, found, int(cfg.cache_shard_mb * 2**20))
        for role, spec, found in roles
    ]
    train, *val = (open_corpus(c, entries) for c, entries in zip(corpora, tokenize_once(corpora, plan, accelerator)))
    if val:
        return train, val[0]
    split = int(len(train) * (1.0 - cfg.val_fraction))
    return train.view(0, split), train.view(split, len(train))


# ----------------------------------------------------------------------------------------------- streaming
@dataclass
class TrainingData:
    """What a run trains and evaluates on: the training windows (map-style, in the token cache) or stream, and the
    fixed windows that each evaluation reads from the training and the validation data."""

    plan: RunPlan  # with what the data decides: the run's length, the stream read
    train: WindowDataset | StreamBatches
    train_eval: WindowDataset
    val: WindowDataset


def load_training_data(plan: RunPlan, accelerator: Accelerator) -> TrainingData:
    if plan.cfg.streaming:
        return open_stream(plan, accelerator)
    train, val = (WindowDataset(s, plan.context_len, plan.stride) for s in load_token_streams(plan, accelerator))
    return TrainingData(plan.with_data(len(train), len(val)), train, train, val)


def stream_sources(plan: RunPlan, readers: int) -> tuple[Source, Source | None, str]:
    """The training and validation sources of a streaming run (None: hold the validation slice out of training's),
    and the line that says what is read."""
    cfg = plan.cfg
    if cfg.dataset is None:
        files = resolve_data(cfg.train_data_path, cfg.val_data_path)
        train = FileSource(files.train, cfg.text_column)
        val = None if files.validation is None else FileSource(files.validation, cfg.text_column)
        return train, val, files.note
    train = open_dataset_source(cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.text_column, readers)
    val_split = cfg.val_split or ("validation" if "validation" in train.split_names else None)
    if val_split == cfg.train_split:
        raise UserError(f"dataset {cfg.dataset!r}: train_split and val_split are both {val_split!r}")
    val = open_dataset_source(cfg.dataset, cfg.dataset_config, val_split, cfg.text_column, 1) if val_split else None
    note = f"dataset {cfg.dataset}: streaming its {cfg.train_split} split ({train.num_shards} shards)"
    return train, val, note + (f", validating on its {val_split} split" if val_split else "")


def open_stream(plan: RunPlan, accelerator: Accelerator) -> TrainingData:
    """A streaming run's data: this process's stream of micro-batches (its readers start when the first batch is
    asked for, from the positions a resume restores), and the fixed evaluation slices: the first windows of the
    validation data or, without any, the first of the training data, which training then skips."""
    cfg, context, stride = plan.cfg, plan.context_len, plan.stride
    readers = Readers(count=accelerator.num_processes * max(1, cfg.stream_workers), seed=cfg.seed)
    train, val, note = stream_sources(plan, readers.count)
    if note and accelerator.is_main_process:
        print(note, flush=True)
    spec = cfg.dataset or cfg.train_data_path
    needed = (cfg.eval_iter * plan.global_batch_size - 1) * stride + context + 1  # tokens of one evaluation

    def first_tokens(source: Source, start: tuple[int, int, int], role: str) -> tuple[np.ndarray, tuple]:
        try:
            tokens, end = read_slice(source, start, needed, cfg.tokenizer, plan.eot_id)
        except UserError as err:
            raise UserError(f"{role} data: {err}") from None
        if start == (0, 0, 0) and not len(tokens):
            where = spec if role == "train" else cfg.val_data_path or f"{spec}'s validation split"
            raise UserError(f"{role} data: data path {where} contains no text")
        return tokens, end

    if val is None:
        val_tokens, held_out = first_tokens(train, (0, 0, 0), "train")
        if held_out[0] >= train.num_shards:
            raise UserError(
                f"train data: {spec} is no longer than one evaluation ({needed:,} tokens: eval_iter x global batch "
                "windows), which would be held out for validation whole: give validation data (val_data_path, "
                "val_split) or lower eval_iter"
            )
        readers = Readers(readers.count, readers.seed, start=held_out)
    else:
        val_tokens = first_tokens(val, (0, 0, 0), "validation")[0]
    train_eval_tokens = first_tokens(train, readers.start, "train")[0]
    train_eval, val_set = (WindowDataset(TokenStream.of(t), context, stride) for t in (train_eval_tokens, val_tokens))
    source = f"{spec} ({train.num_shards} shard{'s' * (train.num_shards != 1)}, column {cfg.text_column})"
    rank = accelerator.process_index
    reader_set = ReaderDataset(train, readers, rank, cfg.stream_workers, cfg.tokenizer, plan.eot_id)
    batches = StreamBatches(
        reader_set, cfg.stream_workers, cfg.batch_size, context, stride, cfg.shuffle_buffer, accelerator.device,
        accelerator.num_processes,
    )  # fmt: skip
    # The main process's view of the files, on every rank: a resume is refused (or not) on all of them alike.
    files = agree(accelerator, train.fingerprint)[0]
    plan = plan.with_stream(len(train_eval), len(val_set), source, readers.start, files)
    return TrainingData(plan, batches, train_eval, val_set)
