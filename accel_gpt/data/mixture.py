"""Weighted mixtures: the training sources a config names (`sources_of`), and which of their windows each optimizer
step draws (`MixtureSampler`): by weight, seeded, the same at any world size and computed afresh from any step.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from accel_gpt.data.streaming import StreamBatches, to_device
from accel_gpt.data.windows import WindowDataset, Windows
from accel_gpt.errors import UserError

OPTION = "train_data_path"
# A name goes into metric keys (val_loss/<name>, tokens_seen/<name>) and file names of trackers.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SHORT_FORM = "[NAME=]PATH:WEIGHT,..."
# A number after the last colon, nan and inf included (refused as weights, not read as part of a path).
WEIGHT_AT_END = re.compile(r":\s*(?:[-+.\d][^:/\\]*|[-+]?(?:nan|inf(?:inity)?)\s*)$", re.IGNORECASE)


@dataclass(frozen=True)
class SourceSpec:
    """One source of the training data: files (`path`, in the forms of `train_data_path`) or a Hugging Face
    `dataset`, its own validation data, and its share of every step (`weight`, relative to the others')."""

    name: str  # in messages and metric keys: val_loss/<name>, val_bpb/<name>, tokens_seen/<name>
    weight: float = 1.0
    path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    val_split: str | None = None  # a dataset's validation split (default: validation when it has one)
    val_path: str | None = None  # files' validation (default: a hub layout's validation files)
    text_column: str = "text"

    @property
    def spec(self) -> str:
        """What it reads, as given: for messages and the cache's entries."""
        return self.dataset or self.path


KEYS = tuple(SourceSpec.__dataclass_fields__)


def is_short_form(value: str) -> bool:
    """Whether a `train_data_path` text is a mixture (`[NAME=]PATH:WEIGHT,...`) rather than one data path: it
    names no existing file and holds several entries, or ends in a weight."""
    if Path(value).exists():
        return False
    return "," in value or WEIGHT_AT_END.search(value) is not None


def _short_form_entries(value: str) -> list[dict]:
    entries = []
    for text in value.split(","):
        path, colon, weight = text.strip().rpartition(":")
        if not colon or not path:
            raise UserError(
                f"{OPTION}: {text.strip()!r} has no weight; a mixture is {SHORT_FORM} (e.g. "
                "books=data/books.txt:3,web=data/web.jsonl:1)"
            )
        entry: dict = {"weight": weight.strip()}
        name, equals, rest = path.partition("=")
        if equals and NAME.fullmatch(name):
            entry["name"], path = name, rest
        entries.append(entry | {"path": path})
    return entries


def _weight(value, name: str) -> float:
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not 0.0 < weight < math.inf:
        raise UserError(f"{OPTION}: source {name}'s weight must be a positive number, got {value!r}")
    return weight


def default_name(entry: dict) -> str:
    """A source's name when none is given: its file's or folder's stem, or its dataset's last part."""
    if entry.get("dataset"):
        base = str(entry["dataset"]).rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(str(entry.get("path", "")))
        base = (path.parent.name if any(c in path.name for c in "*?[") else path.name).split(".")[0]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).lstrip("_.-")
    return base or "source"


def read_sources(value: str | list, defaults: dict) -> list[SourceSpec]:
    """The sources of a mixture: `value` a list of mappings (the config file's and Python's form) or the short
    form's text; a field a source does not set comes from `defaults` (the config's text_column, ...). Every bad
    entry is one UserError naming it."""
    entries = _short_form_entries(value) if isinstance(value, str) else value
    if not entries:
        raise UserError(f"{OPTION}: an empty list names no data")
    sources: list[SourceSpec] = []
    for position, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise UserError(
                f"{OPTION}: source {position} must be a mapping (path or dataset, weight, name), got {entry!r}"
            )
        name = entry.get("name", default_name(entry))
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{OPTION}: source {position}'s name must be letters, digits, _ . or -, got {name!r}")
        if unknown := sorted(set(entry) - set(KEYS)):
            raise UserError(f"{OPTION}: source {name} has unknown key {unknown[0]!r}; a source takes {', '.join(KEYS)}")
        if (entry.get("path") is None) == (entry.get("dataset") is None):
            raise UserError(f"{OPTION}: source {name} needs a path or a dataset (one of them)")
        if entry.get("dataset") is not None and entry.get("val_path") is not None:
            raise UserError(f"{OPTION}: source {name}'s dataset brings its own splits: choose one with val_split")
        if entry.get("path") is not None and entry.get("val_split") is not None:
            raise UserError(f"{OPTION}: source {name} reads files: give its validation files with val_path")
        fields = {key: entry.get(key, defaults.get(key)) for key in KEYS if key not in ("name", "weight")}
        for key, field_value in fields.items():
            if field_value is not None and (not isinstance(field_value, (str, Path)) or str(field_value) == ""):
                raise UserError(f"{OPTION}: source {name}'s {key} must be a non-empty text, got {field_value!r}")
        fields = {key: None if v is None else str(v) for key, v in fields.items()}
        fields["train_split"] = fields["train_split"] or "train"
        fields["text_column"] = fields["text_column"] or "text"
        if any(s.name == name for s in sources):
            raise UserError(
                f"{OPTION}: two sources are named {name}: give each its own name (NAME=PATH:WEIGHT, or name: in "
                "the config file)"
            )
        sources.append(SourceSpec(name, _weight(entry.get("weight", 1.0), name), **fields))
    if not math.isfinite(sum(source.weight for source in sources)):  # each is finite, their total need not be
        raise UserError(f"{OPTION}: the weights add up to more than a number holds; they are relative: scale them down")
    return sources


def is_mixture(value) -> bool:
    return isinstance(value, list) or (isinstance(value, str) and is_short_form(value))


def sources_of(cfg) -> list[SourceSpec]:
    """The training sources a checked config names: the mixture in its `train_data_path`, or its one data path or
    dataset (with the config's own validation settings)."""
    defaults = {"text_column": cfg.text_column, "train_split": cfg.train_split, "val_split": cfg.val_split}
    if is_mixture(cfg.train_data_path):
        return read_sources(cfg.train_data_path, defaults)
    if cfg.dataset is not None:
        return [SourceSpec("train", dataset=cfg.dataset, dataset_config=cfg.dataset_config, **defaults)]
    return [SourceSpec("train", path=cfg.train_data_path, val_path=cfg.val_data_path, text_column=cfg.text_column)]


def as_config(sources: list[SourceSpec]) -> list[dict]:
    """A mixture as the config file writes it: each source's fields that differ from the defaults."""
    defaults = asdict(SourceSpec(""))
    return [{k: v for k, v in asdict(s).items() if k == "name" or v != defaults[k]} for s in sources]


# ----------------------------------------------------------------------------------------------- drawing windows
def windows_drawn(steps, per_step: int, weights: tuple[float, ...]) -> np.ndarray:
    """How many windows each source gives the first `steps` steps (an int or an array of them; a trailing axis of
    one count per source). The first source gets its share of them rounded, the next its share of the rest, and so
    on: each count grows with `steps` (a source never gives a window back), they sum to steps x per_step, and each is
    within a window or two of its weight's exact share, at every step."""
    rest = np.asarray(steps, dtype=np.int64) * per_step
    remaining, counts = sum(weights), []
    for weight in weights[:-1]:
        share = np.floor(rest * (weight / remaining) + 0.5).astype(np.int64)
        counts.append(share)
        rest, remaining = rest - share, remaining - weight
    return np.stack([*counts, rest], axis=-1)


class MixtureWindows(Windows):
    """The sources' windows as one dataset: window ids of source i come after those of sources before it."""

    def __init__(self, parts: list[WindowDataset]):
        self.parts = parts
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        self.context_len = parts[0].context_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, window: int) -> int:
        return int(np.searchsorted(self.offsets, window, side="right")) - 1

    def read_window(self, i: int, out: np.ndarray) -> None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        source = self.source_of(i)
        self.parts[source].read_window(i - int(self.offsets[source]), out)


class MixtureSampler:
    """Micro-batches of a mixture's window ids, step by step, whatever the world size (as `GlobalBatchSampler`).

    Step s takes from each source the windows `windows_drawn` adds at s. A source's windows come in a seeded order
    of their own, and one that runs out starts over in a new order (its next epoch) while the others carry on.
    The step's windows are then shuffled together, so every micro-batch holds the mix. The position is the step
    alone: a resume recomputes it.
    """

    drop_last = True  # read by Accelerate's BatchSamplerShard

    def __init__(
        self,
        sizes: list[int],
        weights: tuple[float, ...],
        batch_size: int,
        global_batch_size: int,
        seed: int,
        num_steps: int,
        shuffle: bool = True,
    ):
        self.sizes, self.weights, self.seed, self.shuffle = sizes, weights, seed, shuffle
        self.batch_size, self.global_batch_size, self.num_steps = batch_size, global_batch_size, num_steps
        self.offsets = np.cumsum([0, *sizes])
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = start_step  # a mixture has no epochs of its own: its sources do

    def __len__(self) -> int:
        return (self.num_steps - self.start_step) * (self.global_batch_size // self.batch_size)

    def __iter__(self):
        for step in range(self.start_step, self.num_steps):
            windows = self.step_windows(step)
            for offset in range(0, self.global_batch_size, self.batch_size):
                yield windows[offset : offset + self.batch_size].tolist()

    @lru_cache(maxsize=8)  # noqa: B019 (a sampler lives as long as its run): a source's order, built once an epoch
    def source_order(self, source: int, epoch: int) -> np.ndarray:
        size = self.sizes[source]
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, 0, source, epoch]).permutation(size)

    def draws(self, step: int) -> list[range]:
        """Which of each source's draws (its windows counted from the run's start, across its epochs) step makes."""
        before, after = windows_drawn(np.array([step, step + 1]), self.global_batch_size, self.weights)
        return [range(int(b), int(a)) for b, a in zip(before, after)]

    def step_windows(self, step: int) -> np.ndarray:
        """Step `step`'s window ids, in the order Accelerate deals them out as micro-batches."""
        ids = []
        for source, drawn in enumerate(self.draws(step)):
            size = self.sizes[source]
            for draw in drawn:
                ids.append(self.offsets[source] + self.source_order(source, draw // size)[draw % size])
        ids = np.array(ids, dtype=np.int64)
        if self.shuffle:
            ids = ids[np.random.default_rng([self.seed, 1, step]).permutation(len(ids))]
        return ids

    def new_epochs(self, step: int) -> list[tuple[int, int]]:
        """(source, epoch) for each epoch of a source that begins at `step`, its windows having run out."""
        begun = []
        for source, drawn in enumerate(self.draws(step)):
            size = self.sizes[source]  # epoch e begins with draw e x size
            first = max(1, -(-drawn.start // size))
            begun += [(source, epoch) for epoch in range(first, (drawn.stop - 1) // size + 1)] if drawn else []
        return begun


class StreamMixture:
    """A mixture read as it trains, on one process: a stream per source (its own readers, packing and shuffle
    buffer), and at each step this process's windows drawn from them by weight (`windows_drawn` over its own share
    of the step), shuffled together and cut into micro-batches. Its position is every stream's and the step."""

    def __init__(
        self, streams: dict[str, StreamBatches], weights: tuple[float, ...], batch_size: int, per_step: int,
        seed: int, rank: int, device,
    ):  # fmt: skip
        self.streams, self.weights, self.batch_size, self.per_step = streams, weights, batch_size, per_step
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.last_sources: list[list[str]] = []  # the sources of the last step's micro-batches, for `batches`

    @property
    def error(self) -> str | None:
        return next((s.error for s in self.streams.values() if s.error is not None), None)

    @property
    def epoch(self) -> int:
        return min(s.epoch for s in self.streams.values())

    def drawn(self, global_step: int) -> np.ndarray:
        """Windows this process drew from each source in the first `global_step` steps."""
        return windows_drawn(global_step, self.per_step, self.weights)

    def step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        counts = np.diff(windows_drawn(np.array([step, step + 1]), self.per_step, self.weights), axis=0)[0]
        names, parts = [], []
        for (name, stream), count in zip(self.streams.items(), counts):
            if count:
                parts.append(stream.next_windows(int(count)))
                names += [name] * int(count)
        order = np.random.default_rng([self.seed, 2, self.rank, step]).permutation(self.per_step)
        windows, names = np.concatenate(parts)[order], [names[i] for i in order]
        cuts = range(0, self.per_step, self.batch_size)
        self.last_sources = [names[k : k + self.batch_size] for k in cuts]
        return [to_device(windows[k : k + self.batch_size], self.device) for k in cuts]

    def steps(self, state, total_steps: int) -> Iterator[Iterator]:
        epochs = {name: stream.epoch for name, stream in self.streams.items()}
        while state.global_step < total_steps:
            state.epoch = self.epoch
            yield iter(self.step_batches(state.global_step))
            for name, stream in self.streams.items():  # a source's readers all began another pass
                if stream.epoch > epochs[name] and self.rank == 0:
                    tqdm.write(f"source {name}: its stream begins epoch {stream.epoch + 1} by step {state.global_step}",
                               file=sys.stdout)  # fmt: skip
                epochs[name] = stream.epoch

    def state_dict(self) -> dict:
        states = {name: stream.state_dict() for name, stream in self.streams.items()}
        arrays = {f"{name}/{key}": array for name, state in states.items() for key, array in state["arrays"].items()}
        return {"arrays": arrays, "meta": {name: state["meta"] for name, state in states.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, stream in self.streams.items():
            arrays = {k.removeprefix(f"{name}/"): v for k, v in state["arrays"].items() if k.startswith(f"{name}/")}
            stream.load_state_dict({"arrays": arrays, "meta": state["meta"][name]})
