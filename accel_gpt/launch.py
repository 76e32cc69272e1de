"""The Accelerator for a launch: one process or many, CPU or GPU, DDP or FSDP (on CPU processes too), with the
CPU threads and TF32 the config asks for. What `accelerate launch` chose is read here, never decided.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator, AutocastKwargs, DataLoaderConfiguration, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object, parse_flag_from_env

from accel_gpt.config import TrainConfig
from accel_gpt.errors import UserError
from accel_gpt.metrics import tracking_options
from accel_gpt.step import check_cuda_graph

T = TypeVar("T")


def use_cpu() -> bool:
    # Without an accelerator, launched processes must ask for CPU explicitly: otherwise Accelerate leaves each one
    # as an unconnected single process instead of joining them in a gloo group.
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Honour an FSDP `accelerate config` on CPU processes too.

    Accelerate wires FSDP only for GPUs and would silently run plain data parallel instead, yet torch's FSDP2 runs
    over gloo: switching it on here lets the sharded path and its consolidated checkpoints be tested on a laptop."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings, as Accelerate would
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 is GPU-only)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Both shared states: every later AcceleratorState() re-copies the process-level one over its own.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def keep_fsdp_loss_in_fp32(accelerator: Accelerator) -> None:
    """FSDP2's mixed precision (param_dtype bf16/fp16) runs without autocast, and Accelerate's policy also casts
    every sharded module's output to that dtype: for the root module that output is the loss, which the model
    computes in fp32 but would be logged, reduced and compared rounded to bf16 (steps of 1/32 near a loss of 5).
    Blocks still hand bf16 activations to each other; only the cast of outputs is dropped."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 2 and plugin.mixed_precision_policy is not None:
        plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy, output_dtype=None)


def strategy_name(accelerator: Accelerator) -> str:
    """How the run is spread, for the console: one process, DDP or FSDP, with the collective backend."""
    kind, backend = accelerator.distributed_type, accelerator.state.backend
    if kind == DistributedType.NO:
        return "one process"
    if kind == DistributedType.FSDP:
        return f"FSDP ({backend})"
    return f"DDP ({backend})" if kind.value.startswith("MULTI_") else kind.value


def set_cpu_threads(cfg: TrainConfig) -> None:
    # `accelerate launch` pins OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core laptop's speed.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cfg.cpu_threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def launch_world_size() -> int:
    """How many processes this launch trains on, known before the Accelerator (whose batch geometry needs it)."""
    return PartialState(cpu=use_cpu()).num_processes


def start_accelerator(cfg: TrainConfig, gradient_accumulation_steps: int) -> Accelerator:
    """The Accelerator for this launch, with CPU threads, FSDP on CPU and TF32 set as the config says."""
    accelerator = Accelerator(
        cpu=use_cpu(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        # Batches are pinned (make_loader), so their copies to the GPU overlap the step before them.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # A captured step must not keep autocast's cached casts across the capture's end (CUDA graphs' notes).
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if cfg.cuda_graph else None,
        **tracking_options(cfg.report_to),
    )
    check_cuda_graph(cfg, accelerator)
    enable_fsdp_on_cpu(accelerator)
    keep_fsdp_loss_in_fp32(accelerator)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg)
    if accelerator.device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return accelerator


def agree(accelerator: Accelerator, work: Callable[[], T]) -> list[T]:
    """Run `work` on every rank and return every rank's result on every rank; if it raised UserError anywhere,
    raise the first such error everywhere, so no rank goes on to a collective that the others never reach."""
    try:
        outcome = (None, work())
    except UserError as err:
        outcome = (str(err), None)
    outcomes = gather_object([outcome])
    if errors := [error for error, _ in outcomes if error]:
        raise UserError(errors[0])
    return [result for _, result in outcomes]


def agree_when_done(
    accelerator: Accelerator, work: Callable[[], T], cancel: threading.Event | None = None, poll_seconds: float = 1.0
) -> list[T]:
    """`agree` for work that may outlast a collective's timeout (NCCL's is minutes), such as tokenizing a large
    corpus on one process per machine while the others wait: the work runs in a thread while every rank asks,
    with one small all-reduce every `poll_seconds`, whether all are done; no collective waits longer than that.
    Interrupted (Ctrl-C), it sets `cancel`, which the work checks, and gives the work a few seconds to clean up."""
    if accelerator.num_processes == 1:
        return agree(accelerator, work)
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("done", work()))
        except BaseException as err:  # raised below, in the rank's own thread, once every rank has finished
            outcome.append(("raised", err))

    thread = threading.Thread(target=run, name="accel_gpt-agree", daemon=True)  # Ctrl-C does not wait for it
    thread.start()
    finished = torch.zeros(1, device=accelerator.device)
    try:
        while True:
            thread.join(timeout=poll_seconds)
            finished.fill_(0.0 if thread.is_alive() else 1.0)
            if accelerator.reduce(finished, reduction="sum").item() == accelerator.num_processes:
                break
    except BaseException:
        if cancel is not None:
            cancel.set()
            thread.join(timeout=10.0)
        raise
    kind, value = outcome[0]

    def result() -> T:
        if kind == "raised":
            raise value
        return value

    return agree(accelerator, result)
