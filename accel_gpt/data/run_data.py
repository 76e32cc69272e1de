"""A training run's data, the one entry point `train.py` calls (`load_training_data`), and the one interface both
modes give it (`RunData`): paths (or a dataset) resolved on every rank, then tokenized once for the whole cluster,
the machines sharing the shards out, and read as windows; or, streaming, a stream of batches read as it trains.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm import tqdm

from accel_gpt.data.cache import TOKENS
from accel_gpt.data.mixture import (
    MixtureSampler,
    MixtureWindows,
    SourceSpec,
    StreamMixture,
    sources_of,
    windows_drawn,
)
from accel_gpt.data.packing import PackedWindows
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
    Windows,
    eval_sampler,
    make_loader,
    mean_bytes_per_token,
)
from accel_gpt.errors import UserError
from accel_gpt.launch import agree, agree_when_done

if TYPE_CHECKING:  # the plan is handed in and handed back; the data package imports nothing above it
    from accel_gpt.plan import RunPlan


def source_files(source: SourceSpec, accelerator: Accelerator) -> DataFiles:
    """A source's training and validation files. Paths are resolved on every rank, so a bad one stops them all; a
    dataset is prepared in `datasets`' cache by one rank per machine first (its errors, too, reach every rank),
    and the others then load what it prepared."""
    if source.dataset is None:
        return resolve_data(source.path, source.val_path)

    def load() -> DataFiles:
        return load_dataset_splits(source.dataset, source.dataset_config, source.train_split, source.val_split)

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


def load_token_streams(
    plan: RunPlan, accelerator: Accelerator, sources: list[SourceSpec]
) -> list[tuple[TokenStream, TokenStream]]:
    """Each source's training and validation tokens (without validation data: the last val_fraction of its
    training tokens), all tokenized at once."""
    cfg, mixture = plan.cfg, len(sources) > 1
    corpora, validated = [], []
    for source in sources:
        files = source_files(source, accelerator)
        prefix = f"{source.name} " if mixture else ""  # whose files and tokens a line speaks of
        if files.note and accelerator.is_main_process:
            print(prefix + files.note, flush=True)
        roles = [(prefix + "train", source.spec, files.train)]
        if files.validation is not None:
            roles.append((prefix + "validation", source.val_path or source.spec, files.validation))
        shard_bytes = int(cfg.cache_shard_mb * 2**20)
        corpora += [
            plan_corpus(spec, cfg.tokenizer, plan.eot_id, role, source.text_column, found, shard_bytes)
            for role, spec, found in roles
        ]
        validated.append(files.validation is not None)
    streams = iter([open_corpus(c, entries) for c, entries in zip(corpora, tokenize_once(corpora, plan, accelerator))])
    pairs = []
    for source, has_validation in zip(sources, validated):
        train = next(streams)
        if has_validation:
            pairs.append((train, next(streams)))
            continue
        if cfg.val_fraction == 0.0:  # `validate` refuses this for one source; a mixture's sources are known here
            raise UserError(f"source {source.name} has no validation data: give it a val_path, or val_fraction above 0")
        split = int(len(train) * (1.0 - cfg.val_fraction))
        pairs.append((train.view(0, split), train.view(split, len(train))))
    return pairs


# ----------------------------------------------------------------------------------------------- the interface
class RunData:
    """What a run trains and evaluates on, as `train.py` uses it in either mode: each step's micro-batches, the
    evaluation loaders (the same fixed windows at every evaluation) and the record their losses make, the position a
    checkpoint saves beyond the trainer's own step and epoch, the checks a resume makes, and a data error held for
    the loop's next sync."""

    def __init__(self, plan: RunPlan, eval_sets: dict[str, tuple[Windows, Iterable]], description: str):
        self.plan = plan  # with what the data decides: the run's length, the stream read
        self.eval_sets = eval_sets  # name -> (windows, the batch sampler that picks the evaluated ones)
        self.description = description  # the training and validation windows, for the run's header line
        self.eval_loaders: dict[str, DataLoader] = {
            name: make_loader(dataset, sampler) for name, (dataset, sampler) in eval_sets.items()
        }

    @property
    def error(self) -> str | None:
        """Bad data this rank met while training (streaming), held until every rank can stop with it."""
        return None

    def prepare(self, accelerator: Accelerator, *objects) -> list:
        """Prepare `objects` (the model and optimizer; none to look at the data alone) with this data's loaders, in
        one call as FSDP needs; returns them prepared."""
        prepared = accelerator.prepare(*objects, *self.eval_loaders.values())  # a tuple: two loaders at least
        self.eval_loaders = dict(zip(self.eval_loaders, prepared[len(objects) :]))
        return list(prepared[: len(objects)])

    def steps(self, state, total_steps: int) -> Iterator:
        """For each step from `state`'s position to `total_steps`, the iterator its micro-batches come from."""
        raise NotImplementedError

    @property
    def source_name(self) -> str:
        """What one source's windows come from, as given (a mixture's window name theirs: `window_sources`)."""
        return self.plan.cfg.dataset or self.plan.cfg.train_data_path

    def window_sources(self, global_step: int) -> list[list[str]] | None:
        """The source of each window of 0-based step `global_step`, by micro-batch in the order Accelerate deals them
        (micro-batch m of rank r is `[m x world_size + r]`); None when all come from `source_name`."""
        return None

    def progress(self, global_step: int) -> dict:
        """What a step's record says of the data beyond `tokens_seen` (a mixture: each source's tokens)."""
        return {}

    def bytes_per_token(self, byte_lengths: np.ndarray) -> dict[str, float]:
        """UTF-8 bytes per target token of each evaluation's windows (for bits per byte)."""
        return {
            name: mean_bytes_per_token(dataset, (i for batch in sampler for i in batch), byte_lengths)
            for name, (dataset, sampler) in self.eval_sets.items()
        }

    def scores(self, losses: dict[str, float], bytes_per_token: dict[str, float]) -> dict:
        """The record of an evaluation whose losses (per `eval_loaders` name) are `losses`: train_loss and val_loss,
        each also in bits per byte (nats per token / ln 2 / bytes per token: comparable across tokenizers)."""
        record = {}
        for split in ("train", "val"):
            record |= loss_fields(split, losses[split], bytes_per_token[split])
        return record

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
        identity, saved = ({"align_documents": False} | d for d in (self.plan.data_identity, saved))  # saved if true
        changed = [f"{k} {saved[k]} -> {v}" for k, v in identity.items() if k in saved and saved[k] != v]
        if changed:
            raise UserError(
                f"cannot resume from {path}: the data order would change ({', '.join(changed)}); resume with the "
                f"settings it was saved with, or start a new run from its weights with --init_from {path}"
            )


def loss_fields(name: str, loss: float, bytes_per_token: float, suffix: str = "") -> dict:
    """`<name>_loss<suffix>`, and `<name>_bpb<suffix>` unless its windows hold special tokens alone (no bytes)."""
    fields = {f"{name}_loss{suffix}": loss}
    if bytes_per_token:
        fields[f"{name}_bpb{suffix}"] = loss / (math.log(2) * bytes_per_token)
    return fields


def fixed_windows(plan: RunPlan, dataset: WindowDataset) -> tuple[WindowDataset, GlobalBatchSampler]:
    """The evaluation windows of `dataset`: its first `eval_iter` global batches in corpus order."""
    return dataset, eval_sampler(len(dataset), plan.cfg.batch_size, plan.global_batch_size, plan.cfg.eval_iter)


class CachedData(RunData):
    """Windows of the token cache in one seeded global order (`GlobalBatchSampler`) that Accelerate deals out to the
    ranks; the trainer's step and epoch are the whole position."""

    def __init__(self, plan: RunPlan, train: WindowDataset, val: WindowDataset):
        eval_sets = {"train": fixed_windows(plan, train), "val": fixed_windows(plan, val)}
        super().__init__(plan, eval_sets, f"{plan.train_windows:,} train / {len(val):,} val windows")
        self.train = train
        self.batches: EpochBatches | None = None  # once prepared

    def training_sampler(self):
        cfg = self.plan.cfg
        return GlobalBatchSampler(len(self.train), cfg.batch_size, self.plan.global_batch_size, seed=cfg.seed)

    def prepare(self, accelerator: Accelerator, *objects) -> list:
        sampler = self.training_sampler()
        *objects, loader = super().prepare(accelerator, *objects, make_loader(self.train, sampler))
        self.batches = EpochBatches(sampler, loader)
        return objects

    def steps(self, state, total_steps: int) -> Iterator:
        return self.batches.steps(state, total_steps)


class Mixed:
    """What a mixture adds to a run's data, in either mode: each source validated on its own (`val_loss/<name>`,
    `val_loss` their mean by weight: the loss on the training mixture), train_loss on a fixed mix of the sources'
    first training windows, and each source's tokens trained on (`tokens_seen/<name>`)."""

    plan: RunPlan
    sources: list[SourceSpec]

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(s.weight for s in self.sources)

    def mixture_eval_sets(self, train: list[Windows], val: list[WindowDataset]) -> dict:
        cfg, batch = self.plan.cfg, self.plan.global_batch_size
        mixed = MixtureWindows(train)
        sizes = [len(t) for t in train]
        order = MixtureSampler(sizes, self.weights, cfg.batch_size, batch, cfg.seed, cfg.eval_iter, False)
        return {"train": (mixed, order)} | {
            f"val/{s.name}": fixed_windows(self.plan, v) for s, v in zip(self.sources, val)
        }

    def shares(self) -> dict[str, float]:
        total = sum(self.weights)
        return {s.name: s.weight / total for s in self.sources}

    def drawn(self, global_step: int) -> np.ndarray:
        """Windows trained on from each source in the first `global_step` steps."""
        raise NotImplementedError

    def progress(self, global_step: int) -> dict:
        drawn = self.drawn(global_step)
        return {f"tokens_seen/{s.name}": int(n) * self.plan.context_len for s, n in zip(self.sources, drawn)}

    def scores(self, losses: dict[str, float], bytes_per_token: dict[str, float]) -> dict:
        record = loss_fields("train", losses["train"], bytes_per_token["train"])
        share = self.shares()
        mean_bytes = sum(share[n] * bytes_per_token[f"val/{n}"] for n in share)
        record |= loss_fields("val", sum(share[n] * losses[f"val/{n}"] for n in share), mean_bytes)
        for name in share:
            record |= loss_fields("val", losses[f"val/{name}"], bytes_per_token[f"val/{name}"], f"/{name}")
        return record

    def mixture_description(self, train: str, val: list[WindowDataset]) -> str:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in self.shares().items())
        return f"{train} of {len(self.sources)} sources ({shares}) / {sum(map(len, val)):,} val windows"


class MixtureData(Mixed, CachedData):
    """A weighted mixture on the token cache: every step takes each source's share of windows (`MixtureSampler`),
    so the step alone is the position, as for one source."""

    def __init__(self, plan: RunPlan, sources: list[SourceSpec], train: list[Windows], val: list[WindowDataset]):
        self.plan, self.sources = plan, sources
        self.sizes = [len(t) for t in train]
        description = self.mixture_description(f"{sum(self.sizes):,} train windows", val)
        RunData.__init__(self, plan, self.mixture_eval_sets(train, val), description)
        self.train, self.batches, self.is_main = MixtureWindows(train), None, False

    def training_sampler(self):
        cfg = self.plan.cfg
        return MixtureSampler(
            self.sizes, self.weights, cfg.batch_size, self.plan.global_batch_size, cfg.seed, self.plan.total_steps
        )

    def prepare(self, accelerator: Accelerator, *objects) -> list:
        self.is_main = accelerator.is_main_process
        return super().prepare(accelerator, *objects)

    def steps(self, state, total_steps: int) -> Iterator:
        sampler = self.batches.sampler
        for batches in super().steps(state, total_steps):
            if self.is_main:  # a source that ran out carries on in a new order; the others are not held back
                for source, epoch in sampler.new_epochs(state.global_step):
                    tqdm.write(
                        f"source {self.sources[source].name}: its {self.sizes[source]:,} windows all drawn, epoch "
                        f"{epoch + 1} of them begins at step {state.global_step + 1} in a new order",
                        file=sys.stdout,
                    )
            yield batches

    def drawn(self, global_step: int) -> np.ndarray:
        return windows_drawn(global_step, self.plan.global_batch_size, self.weights)

    def window_sources(self, global_step: int) -> list[list[str]]:
        ids, batch = self.batches.sampler.step_windows(global_step), self.plan.cfg.batch_size
        names = [self.sources[self.train.source_of(int(i))].name for i in ids]
        return [names[k : k + batch] for k in range(0, len(names), batch)]


class StreamData(RunData):
    """This rank's own stream of micro-batches (nothing to deal out), whose readers' positions, packing and shuffle
    buffer a checkpoint saves per rank, so a resume needs the same number of processes and unchanged files."""

    def __init__(self, plan: RunPlan, stream: StreamBatches, train_eval: WindowDataset, val: WindowDataset):
        eval_sets = {"train": fixed_windows(plan, train_eval), "val": fixed_windows(plan, val)}
        super().__init__(plan, eval_sets, f"streamed from {plan.stream_source} train / {len(val):,} val windows")
        self.stream = stream
        self.rank = 0  # once prepared

    def prepare(self, accelerator: Accelerator, *objects) -> list:
        self.rank = accelerator.process_index
        return super().prepare(accelerator, *objects)

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
        self.stream.load_state_dict(positions[self.rank])

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


def training_windows(plan: RunPlan, accelerator: Accelerator, tokens: TokenStream, source: SourceSpec) -> Windows:
    """A source's training windows: every `stride` tokens, or documents packed into windows (`align_documents`).
    Validation keeps windows at fixed strides, so its loss compares runs with and without alignment."""
    if not plan.cfg.align_documents:
        return WindowDataset(tokens, plan.context_len, plan.stride)
    windows = PackedWindows(tokens, plan.eot_id, plan.context_len)
    if accelerator.is_main_process:
        print(windows.packing.line("train" if source.name == "train" else source.name), flush=True)
    return windows


class StreamMixtureData(Mixed, StreamData):
    """A weighted mixture read as it trains: a stream per source on every process (`StreamMixture`), each step
    this process's windows drawn from them by weight; a checkpoint saves every source's stream."""

    def __init__(
        self, plan: RunPlan, sources: list[SourceSpec], stream: StreamMixture, train_eval: list, val: list
    ):  # fmt: skip
        self.plan, self.sources = plan, sources
        description = self.mixture_description("streamed", val)
        RunData.__init__(self, plan, self.mixture_eval_sets(train_eval, val), description)
        self.stream, self.rank = stream, 0

    def drawn(self, global_step: int) -> np.ndarray:
        return self.plan.world_size * self.stream.drawn(global_step)

    def window_sources(self, global_step: int) -> list[list[str] | None]:
        # This process's own micro-batches (each process reads its own streams), where `batches` looks for them.
        mine = self.stream.last_sources
        world = self.plan.world_size
        return [mine[k // world] if k % world == self.rank else None for k in range(len(mine) * world)]


def load_training_data(plan: RunPlan, accelerator: Accelerator) -> RunData:
    """The run's data, in the mode its config names; `RunData.plan` is `plan` with what the data decided."""
    if plan.cfg.streaming:
        return open_stream(plan, accelerator)
    sources = sources_of(plan.cfg)
    windows = [
        [training_windows(plan, accelerator, train, source), WindowDataset(val, plan.context_len, plan.stride)]
        for source, (train, val) in zip(sources, load_token_streams(plan, accelerator, sources))
    ]
    if len(sources) == 1:
        train, val = windows[0]
        return CachedData(plan.with_data(len(train), len(val)), train, val)
    train, val = [w[0] for w in windows], [w[1] for w in windows]
    plan = plan.with_mixture([(s, len(t), len(v)) for s, t, v in zip(sources, train, val)])
    return MixtureData(plan, sources, train, val)


# ----------------------------------------------------------------------------------------------- streaming
def stream_sources(source: SourceSpec, readers: int) -> tuple[Source, Source | None, str]:
    """The training and validation streams of a source (None: hold the validation slice out of training's), and
    the line that says what is read."""
    if source.dataset is None:
        files = resolve_data(source.path, source.val_path)
        train = FileSource(files.train, source.text_column)
        val = None if files.validation is None else FileSource(files.validation, source.text_column)
        return train, val, files.note
    train = open_dataset_source(source.dataset, source.dataset_config, source.train_split, source.text_column, readers)
    val_split = validation_split(source.dataset, train.split_names, source.train_split, source.val_split)
    val = (
        open_dataset_source(source.dataset, source.dataset_config, val_split, source.text_column, 1)
        if val_split
        else None
    )
    note = f"dataset {source.dataset}: streaming its {source.train_split} split ({train.num_shards} shards)"
    return train, val, note + (f", validating on its {val_split} split" if val_split else "")


@dataclass
class SourceStream:
    """One source read as it trains: this process's stream of windows, and the fixed slices evaluation reads."""

    batches: StreamBatches
    train_eval: WindowDataset
    val: WindowDataset
    description: str  # what is read, e.g. "Salesforce/wikitext (2 shards, column text)"
    held_out: tuple[int, int, int]
    files: list  # what identifies its files (`streaming.files_fingerprint`)


def open_source_stream(plan: RunPlan, accelerator: Accelerator, source: SourceSpec, mixture: bool) -> SourceStream:
    """A source's stream on this process (its readers start when the first window is asked for, from the positions
    a resume restores), and its fixed evaluation slices: the first windows of its validation data or, without any,
    the first of its training data, which training then skips."""
    cfg, context, stride = plan.cfg, plan.context_len, plan.stride
    readers = Readers(count=accelerator.num_processes * max(1, cfg.stream_workers), seed=cfg.seed)
    train, val, note = stream_sources(source, readers.count)
    prefix = f"{source.name} " if mixture else ""
    if note and accelerator.is_main_process:
        print(prefix + note, flush=True)
    needed = (cfg.eval_iter * plan.global_batch_size - 1) * stride + context + 1  # tokens of one evaluation

    def first_tokens(stream: Source, start: tuple[int, int, int], role: str) -> tuple[np.ndarray, tuple]:
        try:
            tokens, end = read_slice(stream, start, needed, cfg.tokenizer, plan.eot_id)
        except UserError as err:
            raise UserError(f"{prefix}{role} data: {err}") from None
        if start == (0, 0, 0) and not len(tokens):
            where = source.spec if role == "train" else source.val_path or f"{source.spec}'s validation split"
            raise UserError(f"{prefix}{role} data: data path {where} contains no text")
        return tokens, end

    if val is None:
        val_tokens, held_out = first_tokens(train, (0, 0, 0), "train")
        if held_out[0] >= train.num_shards:
            raise UserError(
                f"{prefix}train data: {source.spec} is no longer than one evaluation ({needed:,} tokens: eval_iter x "
                "global batch windows), which would be held out for validation whole: give validation data "
                "(val_data_path, val_split) or lower eval_iter"
            )
        readers = Readers(readers.count, readers.seed, start=held_out)
    else:
        val_tokens = first_tokens(val, (0, 0, 0), "validation")[0]
    train_eval_tokens = first_tokens(train, readers.start, "train")[0]
    train_eval, val_set = (WindowDataset(TokenStream.of(t), context, stride) for t in (train_eval_tokens, val_tokens))
    shards = f"{train.num_shards} shard{'s' * (train.num_shards != 1)}"
    rank = accelerator.process_index
    reader_set = ReaderDataset(train, readers, rank, cfg.stream_workers, cfg.tokenizer, plan.eot_id)
    batches = StreamBatches(
        reader_set, cfg.stream_workers, cfg.batch_size, context, stride, cfg.shuffle_buffer, accelerator.device,
        accelerator.num_processes, cfg.align_documents,
    )  # fmt: skip
    # The main process's view of the files, on every rank: a resume is refused (or not) on all of them alike.
    files = agree(accelerator, train.fingerprint)[0]
    description = f"{source.spec} ({shards}, column {source.text_column})"
    return SourceStream(batches, train_eval, val_set, description, readers.start, files)


def open_stream(plan: RunPlan, accelerator: Accelerator) -> StreamData:
    """A streaming run's data: one source's stream, or a mixture's, one stream per source."""
    sources = sources_of(plan.cfg)
    streams = [open_source_stream(plan, accelerator, source, len(sources) > 1) for source in sources]
    if len(sources) == 1:
        (one,) = streams
        plan = plan.with_stream(len(one.train_eval), len(one.val), one.description, one.held_out, one.files)
        return StreamData(plan, one.batches, one.train_eval, one.val)
    for source, stream in zip(sources, streams):  # each source's evaluation slices, checked as one source's are
        plan.with_stream(
            len(stream.train_eval), len(stream.val), source.name, stream.held_out, [], f"source {source.name}'s "
        )
    plan = plan.with_stream(
        sum(len(s.train_eval) for s in streams), sum(len(s.val) for s in streams),
        "; ".join(f"{source.name}: {s.description}" for source, s in zip(sources, streams)),
        tuple(n for s in streams for n in s.held_out), [f for s in streams for f in s.files],
    )  # fmt: skip
    plan = dataclasses.replace(plan, mixture=tuple((source.name, source.weight, 0) for source in sources))
    mixed = StreamMixture(
        {source.name: s.batches for source, s in zip(sources, streams)}, tuple(source.weight for source in sources),
        plan.cfg.batch_size, plan.cfg.batch_size * plan.gradient_accumulation_steps, plan.cfg.seed,
        accelerator.process_index, accelerator.device,
    )  # fmt: skip
    return StreamMixtureData(plan, sources, mixed, [s.train_eval for s in streams], [s.val for s in streams])
