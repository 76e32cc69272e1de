"""A training run's data, the one entry point `train.py` calls (`load_training_data`), and the one interface both
modes give it (`RunData`): paths (or a dataset) resolved on every rank, then tokenized once for the whole cluster,
the machines sharing the shards out, and read as windows; or, streaming, a stream of batches read as it trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from accel_gpt.data.cache import TOKENS
from accel_gpt.data.sources import DataFiles, load_dataset_splits, resolve_data, validation_split
from accel_gpt.data.streaming import (
    FileSource,
    ReaderDataset,
    Readers,
    Source,
    StreamBatches,
    check_stream_files,
    open_dataset_source,
    read_slice,
)
from accel_gpt.data.tokens import CANCEL, Corpus, TokenStream, build_shards, open_corpus, plan_corpus, share_out
from accel_gpt.data.windows import (
    EpochBatches,
    GlobalBatchSampler,
    WindowDataset,
    eval_bytes_per_token,
    make_eval_loader,
    make_loader,
)
from accel_gpt.errors import UserError
from accel_gpt.launch import agree, agree_when_done

if TYPE_CHECKING:  # the plan is handed in and handed back; the data package imports nothing above it
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


# ----------------------------------------------------------------------------------------------- the interface
class RunData:
    """What a run trains and evaluates on, as `train.py` uses it in either mode: each step's micro-batches, the
    evaluation loaders (the same fixed windows at every evaluation), the position a checkpoint saves beyond the
    trainer's own step and epoch, the checks a resume makes, and a data error held for the loop's next sync."""

    def __init__(self, plan: RunPlan, train_eval: WindowDataset, val: WindowDataset, description: str):
        self.plan = plan  # with what the data decides: the run's length, the stream read
        self.train_eval, self.val = train_eval, val
        self.description = description  # the training data, for the run's header line
        cfg = plan.cfg
        self.eval_loaders: list[DataLoader] = [
            make_eval_loader(ds, cfg.batch_size, plan.global_batch_size, cfg.eval_iter) for ds in (train_eval, val)
        ]

    @property
    def error(self) -> str | None:
        """Bad data this rank met while training (streaming), held until every rank can stop with it."""
        return None

    def prepare(self, accelerator: Accelerator, *objects) -> list:
        """Prepare `objects` (the model and optimizer; none to look at the data alone) with this data's loaders, in
        one call as FSDP needs; returns them prepared."""
        *objects, self.eval_loaders[0], self.eval_loaders[1] = accelerator.prepare(*objects, *self.eval_loaders)
        return objects

    def steps(self, state, total_steps: int) -> Iterator:
        """For each step from `state`'s position to `total_steps`, the iterator its micro-batches come from."""
        raise NotImplementedError

    def bytes_per_token(self, byte_lengths: np.ndarray) -> tuple[float, float]:
        """UTF-8 bytes per target token of the training and validation evaluation windows (for bits per byte)."""
        cfg, batch = self.plan.cfg, self.plan.global_batch_size
        return tuple(eval_bytes_per_token(ds, batch, cfg.eval_iter, byte_lengths) for ds in (self.train_eval, self.val))

    def checkpoint_fields(self) -> dict:
        """What a checkpoint's trainer state records of the data, beyond `plan.data_identity`."""
        return {}

    def positions(self) -> list[dict] | None:
        """Every rank's position beyond the trainer's step and epoch, gathered (a collective: call on every rank);
        None where those are the whole position."""
        return None

    def load_positions(self, positions: list[dict] | None) -> None:
        """Restore what `positions` gathered, read back from a checkpoint that `check_resume` accepted."""

    def check_resume(self, saved: dict, path: Path, world_size: int) -> None:
        """Refuse, in one line, to resume checkpoint `path` (its trainer state: `saved`) into a run that would not
        continue its data: another kind of data, stream or data order."""
        cfg = self.plan.cfg
        if saved.get("streaming", False) != cfg.streaming:
            kind = "a streaming run" if saved.get("streaming") else "a run on the token cache"
            raise UserError(f"cannot resume {path}: it was saved by {kind}; resume with streaming {not cfg.streaming}")
        changed = [f"{k} {saved[k]} -> {v}" for k, v in self.plan.data_identity.items() if k in saved and saved[k] != v]
        if changed:
            raise UserError(
                f"cannot resume from {path}: the data order would change ({', '.join(changed)}); resume with the "
                f"settings it was saved with, or start a new run from its weights with --init_from {path}"
            )


class CachedData(RunData):
    """Windows of the token cache in one seeded global order (`GlobalBatchSampler`) that Accelerate deals out to the
    ranks; the trainer's step and epoch are the whole position."""

    def __init__(self, plan: RunPlan, train: WindowDataset, val: WindowDataset):
        super().__init__(plan, train, val, f"{plan.train_windows:,}")
        self.train = train
        self.batches: EpochBatches | None = None  # once prepared

    def prepare(self, accelerator: Accelerator, *objects) -> list:
        cfg = self.plan.cfg
        sampler = GlobalBatchSampler(len(self.train), cfg.batch_size, self.plan.global_batch_size, seed=cfg.seed)
        *objects, loader = super().prepare(accelerator, *objects, make_loader(self.train, sampler))
        self.batches = EpochBatches(sampler, loader)
        return objects

    def steps(self, state, total_steps: int) -> Iterator:
        return self.batches.steps(state, total_steps)


class StreamData(RunData):
    """This rank's own stream of micro-batches (nothing to deal out), whose readers' positions, packing and shuffle
    buffer a checkpoint saves per rank, so a resume needs the same number of processes and unchanged files."""

    def __init__(self, plan: RunPlan, stream: StreamBatches, train_eval: WindowDataset, val: WindowDataset):
        super().__init__(plan, train_eval, val, f"streamed from {plan.stream_source}")
        self.stream = stream

    @property
    def error(self) -> str | None:
        return self.stream.error

    def steps(self, state, total_steps: int) -> Iterator:
        return self.stream.steps(state, total_steps)

    def checkpoint_fields(self) -> dict:
        return {"stream_files": self.plan.stream_files}

    def positions(self) -> list[dict]:
        return gather_object([self.stream.state_dict()])

    def load_positions(self, positions: list[dict] | None) -> None:
        if positions is None:
            raise UserError("the checkpoint of this streaming run holds no stream position: it is damaged")
        self.stream.load_state_dict(positions[self.stream.readers.rank])

    def check_resume(self, saved: dict, path: Path, world_size: int) -> None:
        if saved.get("streaming") and saved["world_size"] != world_size:
            raise UserError(
                f"cannot resume {path} on {world_size} processes: its stream was read by {saved['world_size']} "
                f"processes x {saved['stream_workers']} stream_workers, each resuming where it stopped; resume with "
                f"{saved['world_size']} processes"
            )
        if "stream_files" in saved:  # checkpoints of earlier versions did not record them
            check_stream_files(saved["stream_files"], self.plan.stream_files, path)
        super().check_resume(saved, path, world_size)


def load_training_data(plan: RunPlan, accelerator: Accelerator) -> RunData:
    """The run's data, in the mode its config names; `RunData.plan` is `plan` with what the data decided."""
    if plan.cfg.streaming:
        return open_stream(plan, accelerator)
    train, val = (WindowDataset(s, plan.context_len, plan.stride) for s in load_token_streams(plan, accelerator))
    return CachedData(plan.with_data(len(train), len(val)), train, val)


# ----------------------------------------------------------------------------------------------- streaming
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
    val_split = validation_split(cfg.dataset, train.split_names, cfg.train_split, cfg.val_split)
    val = open_dataset_source(cfg.dataset, cfg.dataset_config, val_split, cfg.text_column, 1) if val_split else None
    note = f"dataset {cfg.dataset}: streaming its {cfg.train_split} split ({train.num_shards} shards)"
    return train, val, note + (f", validating on its {val_split} split" if val_split else "")


def open_stream(plan: RunPlan, accelerator: Accelerator) -> StreamData:
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
    return StreamData(plan, batches, train_eval, val_set)
