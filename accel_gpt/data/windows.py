"""Token stream -> (input, target) windows -> world-size-independent batches.

`GlobalBatchSampler` fixes which windows form each optimizer step; Accelerate's `prepare` is the single place that
deals those batches out to ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from accel_gpt.data.tokens import TokenStream


# ----------------------------------------------------------------------------------------------- windows
class Windows(Dataset):
    """(input, target) windows of `context_len` tokens, shifted by one, read by id."""

    context_len: int

    def read_window(self, i: int, out: np.ndarray) -> None:
        """Window i's `context_len + 1` tokens into `out`."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.__getitems__([i])
        return inputs[0], targets[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `indices` as one batch `([n, context_len], [n, context_len])`, read into one buffer: the
        DataLoader calls this once per micro-batch, which costs a fraction of reading and stacking window by window
        (the host's share of a small model's step on a GPU)."""
        windows = np.empty((len(indices), self.context_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            self.read_window(i, windows[row])
        batch = torch.from_numpy(windows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class WindowDataset(Windows):
    """Window i is tokens `[i*stride, i*stride + context_len + 1)`, returned as (input, target) shifted by one."""

    def __init__(self, stream: TokenStream, context_len: int, stride: int):
        self.stream, self.context_len, self.stride = stream, context_len, stride
        span = len(stream) - (context_len + 1)
        self.num_windows = 0 if span < 0 else span // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def read_window(self, i: int, out: np.ndarray) -> None:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        self.stream.read(i * self.stride, i * self.stride + self.context_len + 1, out=out)


class GlobalBatchSampler:
    """Micro-batches of window indices whose grouping into optimizer steps ignores the world size.

    Each epoch is a seeded permutation of the windows cut into steps of `global_batch_size` windows, each step into
    micro-batches of `batch_size`. Accelerate hands micro-batch k to rank k % world_size, so 1 process x batch 8 and
    2 processes x batch 4 train on the same 8 windows at every step. Incomplete final steps are dropped, so every
    rank gets the same number of batches (DDP never waits on a rank that ran out).
    """

    drop_last = True  # read by Accelerate's BatchSamplerShard

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        max_steps_per_epoch: int | None = None,
    ):
        if global_batch_size % batch_size:
            raise ValueError("global_batch_size must be a multiple of batch_size")
        self.num_windows, self.batch_size, self.global_batch_size = num_windows, batch_size, global_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_windows // global_batch_size
        if max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Where the next iteration begins: resume lands here without reading the skipped windows."""
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_windows)
        return torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch_size // self.batch_size)

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch_size
            for offset in range(base, base + self.global_batch_size, self.batch_size):
                yield order[offset : offset + self.batch_size].tolist()


def already_collated(batch):
    return batch  # WindowDataset.__getitems__ returns whole batches; a stream's readers, whole chunks


def eval_sampler(num_windows: int, batch_size: int, global_batch_size: int, eval_iter: int) -> GlobalBatchSampler:
    """The first `eval_iter` global batches of `num_windows` windows in corpus order: the same windows at every
    evaluation and at any world size (once prepared, Accelerate deals their micro-batches out to ranks like the
    training ones)."""
    return GlobalBatchSampler(num_windows, batch_size, global_batch_size, shuffle=False, max_steps_per_epoch=eval_iter)


def make_eval_loader(dataset: Windows, batch_size: int, global_batch_size: int, eval_iter: int) -> DataLoader:
    """A loader of `eval_sampler`'s windows of `dataset`."""
    return make_loader(dataset, eval_sampler(len(dataset), batch_size, global_batch_size, eval_iter))


def eval_bytes_per_token(
    dataset: WindowDataset, global_batch_size: int, eval_iter: int, byte_lengths: np.ndarray
) -> float:
    """The mean UTF-8 bytes of text per target token of the windows `make_eval_loader` reads (`byte_lengths`: each
    token id's, `tokenizer.token_byte_lengths`): their loss in nats per token, divided by this and by ln 2, is bits
    per byte, which compares models with different tokenizers."""
    windows = min(len(dataset) // global_batch_size, eval_iter) * global_batch_size
    return mean_bytes_per_token(dataset, range(windows), byte_lengths)


def mean_bytes_per_token(dataset: Windows, windows: Iterable[int], byte_lengths: np.ndarray) -> float:
    """The mean UTF-8 bytes per target token of `dataset`'s `windows`."""
    tokens, total, count = np.empty(dataset.context_len + 1, dtype=np.int64), 0, 0
    for i in windows:
        dataset.read_window(i, tokens)
        total += int(byte_lengths[tokens[1:]].sum())
        count += 1
    return total / (count * dataset.context_len)


def make_loader(dataset: Windows, sampler) -> DataLoader:
    # Reading a window is a memory-mapped slice, far faster than a training step: no worker processes needed.
    # A private generator: creating an iterator then draws nothing from the global RNG that dropout uses,
    # so a resumed run's dropout stream continues exactly where the checkpoint left it. Pinned batches copy to a
    # GPU without making the host wait.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=0,
        generator=torch.Generator(),
        collate_fn=already_collated,
        pin_memory=torch.cuda.is_available(),
    )


class EpochBatches:
    """The training windows' micro-batches, step by step: one pass of the (prepared) loader per epoch, from the
    position that the trainer's state holds and that `TrainerState.advance` moves on after each step."""

    def __init__(self, sampler: GlobalBatchSampler, loader: DataLoader):
        self.sampler, self.loader = sampler, loader

    def steps(self, state, total_steps: int):
        """For each step left, the iterator its micro-batches come from."""
        while state.global_step < total_steps:
            self.sampler.set_position(state.epoch, state.step_in_epoch)
            batches, epoch = iter(self.loader), state.epoch
            while state.epoch == epoch and state.global_step < total_steps:
                yield batches
