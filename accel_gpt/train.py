"""The training loop: wires config, data, model, schedule, checkpoints and logging together on Accelerate.

Run with `accelerate launch -m accel_gpt.train [--config FILE] [--key value ...]` (or plain `python -m`);
the launcher, not this code, decides between one CPU, gloo processes, GPUs and machines.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, AutocastKwargs, DataLoaderConfiguration, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    gather_object,
    parse_flag_from_env,
    set_seed,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from accel_gpt.checkpoint import (
    capture_rng_state,
    full_state_dicts,
    list_checkpoints,
    load_checkpoint,
    load_rng_states,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    set_aside_newer,
)
from accel_gpt.config import TrainConfig, parse_config
from accel_gpt.data import GlobalBatchSampler, TokenStream, WindowDataset, make_loader, tokenize_corpus
from accel_gpt.errors import UserError
from accel_gpt.hf import load_hf_gpt2, read_hf_gpt2_config
from accel_gpt.metrics import RunLogger, flops_per_token, peak_flops, peak_memory_mib, tracking_options
from accel_gpt.model import GPTConfig, GPTModel, attention_backends, generate_text
from accel_gpt.rundir import complete_already, resolve_run_dirs
from accel_gpt.schedule import clips_gradients_at, learning_rate_at
from accel_gpt.step import check_cuda_graph, make_step
from accel_gpt.tokenizer import get_tokenizer


@dataclass
class TrainerState:
    """Everything that says where a run is; saved in every checkpoint as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`: the data position, in world-size-free units
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite gradient norm


def batch_geometry(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(gradient_accumulation_steps, global_batch_size) so that global = batch * accumulation * world."""
    if cfg.global_batch_size is None:
        return cfg.gradient_accumulation_steps, cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    per_step = cfg.batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise UserError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of batch_size x processes "
            f"({cfg.batch_size} x {world_size} = {per_step})"
        )
    return cfg.global_batch_size // per_step, cfg.global_batch_size


def build_optimizer(model: GPTModel, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices only: biases and LayerNorm weights (1-D) are not regularised.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel per step, and it honours `found_inf`, which lets a non-finite step be skipped on the
    # device without waiting for the gradient norm on the host.
    return torch.optim.AdamW(groups, lr=cfg.initial_lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator) -> float:
    """Mean loss over the evaluation windows. Every rank reads as many micro-batches of them as the others, so
    the mean of the ranks' means is the mean over all windows."""
    model.eval()
    total, batches = torch.zeros((), device=accelerator.device), 0
    for inputs, targets in loader:
        total += model(inputs, targets)
        batches += 1
    model.train()
    return accelerator.reduce(total / batches, reduction="mean").item()


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


def start_accelerator(cfg: TrainConfig) -> tuple[Accelerator, int, int]:
    """The Accelerator for this launch, with (gradient_accumulation_steps, global_batch_size) for its world size."""
    world_size = PartialState(cpu=use_cpu()).num_processes
    accumulation, global_batch = batch_geometry(cfg, world_size)
    accelerator = Accelerator(
        cpu=use_cpu(),
        gradient_accumulation_steps=accumulation,
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
    return accelerator, accumulation, global_batch


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Give this rank random streams of its own (dropout masks), derived from the run's seed, the rank and the
    step they start at: with one shared seed every DDP rank would draw the same masks."""
    set_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def model_config_for(cfg: TrainConfig, tokenizer) -> GPTConfig:
    if not cfg.init_from:
        return cfg.model_config(tokenizer.n_vocab)
    model_cfg = read_hf_gpt2_config(cfg.init_from, cfg.dropout, cfg.vocab_multiple)
    if model_cfg.vocabulary_size != tokenizer.n_vocab:
        raise UserError(
            f"init_from model has {model_cfg.vocabulary_size} tokens, the {cfg.tokenizer} tokenizer {tokenizer.n_vocab}"
        )
    return model_cfg


def build_model(cfg: TrainConfig, model_cfg: GPTConfig) -> GPTModel:
    model = load_hf_gpt2(cfg.init_from, model_cfg) if cfg.init_from else GPTModel(model_cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk
    return model


def load_token_streams(cfg: TrainConfig, accelerator: Accelerator, eot_id: int) -> tuple[TokenStream, TokenStream]:
    cache_dir = cfg.token_cache_dir()
    with accelerator.local_main_process_first():  # one rank per machine tokenizes; the others hit its cache
        train = tokenize_corpus(cfg.train_data_path, cfg.tokenizer, eot_id, cache_dir, cfg.num_proc)[0]
        if cfg.val_data_path is not None:
            val = tokenize_corpus(cfg.val_data_path, cfg.tokenizer, eot_id, cache_dir, cfg.num_proc, "validation")
            return train, val[0]
    split = int(len(train) * (1.0 - cfg.val_fraction))
    return train.view(0, split), train.view(split, len(train))


@dataclass
class RunData:
    train_set: WindowDataset
    val_set: WindowDataset
    train_sampler: GlobalBatchSampler
    loaders: tuple[DataLoader, DataLoader, DataLoader]  # train, train-eval, val (unprepared)


def build_data(cfg: TrainConfig, streams, context_len: int, stride: int, global_batch: int) -> RunData:
    train_set, val_set = (WindowDataset(s, context_len, stride) for s in streams)
    train_sampler = GlobalBatchSampler(len(train_set), cfg.batch_size, global_batch, seed=cfg.seed)
    if train_sampler.steps_per_epoch == 0:
        raise UserError(
            f"training data has {len(train_set)} windows of {context_len + 1} tokens; one optimizer step needs "
            f"{global_batch} (lower batch_size/context_len or add text)"
        )
    # Evaluation reads the first eval_iter global batches in corpus order: the same windows every time and at any
    # world size (Accelerate deals their micro-batches out to ranks like the training ones).
    train_eval, val_eval = (
        GlobalBatchSampler(len(ds), cfg.batch_size, global_batch, shuffle=False, max_steps_per_epoch=cfg.eval_iter)
        for ds in (train_set, val_set)
    )
    if val_eval.steps_per_epoch == 0:
        raise UserError(
            f"validation data has {len(val_set)} windows of {context_len + 1} tokens; an evaluation needs one "
            f"global batch of {global_batch} (raise val_fraction, add validation text or lower batch_size)"
        )
    loaders = (
        make_loader(train_set, train_sampler),
        make_loader(train_set, train_eval),
        make_loader(val_set, val_eval),
    )
    return RunData(train_set, val_set, train_sampler, loaders)


class StepWindow:
    """Steps whose loss and gradient norm are still on the device.

    Reading a value on the host makes the host wait for the GPU, which then idles while the next step is
    launched. So the values wait here and one transfer every `log_every` steps brings them all, exact, one record
    per step; the same collective says whether any rank was asked to stop. Step times are the window's mean."""

    def __init__(self, accelerator: Accelerator, tokens_per_step: int, step_flops: float, device_peak: float | None):
        self.accelerator, self.tokens_per_step = accelerator, tokens_per_step
        self.step_flops, self.device_peak = step_flops, device_peak
        self.records: list[dict] = []
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.restart_clock()

    def __len__(self) -> int:
        return len(self.records)

    def restart_clock(self) -> None:
        """Start timing from now: evaluation, samples and saves between windows are not step time."""
        self.started = time.perf_counter()

    def add(self, record: dict, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.records.append(record)
        self.losses.append(loss)
        self.norms.append(grad_norm)

    def flush(self, stop_requested: bool) -> tuple[list[dict], bool]:
        """The window's finished records, and whether any rank asked to stop."""
        accelerator, world_size, steps = self.accelerator, self.accelerator.num_processes, len(self.records)
        losses = torch.stack(self.losses)
        stop = torch.full((1,), float(stop_requested), device=losses.device)
        summed = accelerator.reduce(torch.cat([losses, stop]), reduction="sum")
        # The norm is taken after the gradient all-reduce, the same on every rank: no need to reduce it.
        values = torch.cat([summed, torch.stack(self.norms)]).tolist()  # the window's one host sync
        seconds = (time.perf_counter() - self.started) / steps
        memory = peak_memory_mib(accelerator.device)
        records, loss_sums, stops, norms = self.records, values[:steps], values[steps], values[steps + 1 :]
        for record, loss_sum, norm in zip(records, loss_sums, norms):
            record |= {
                "loss": loss_sum / world_size,
                "grad_norm": norm,
                "tokens_per_sec": self.tokens_per_step / seconds,
                "step_time": seconds,
                "peak_memory_mib": memory,
            }
            if self.device_peak:
                record["mfu"] = self.step_flops / seconds / (self.device_peak * world_size)
        self.records, self.losses, self.norms = [], [], []
        return records, stops > 0


class StopSignal:
    """Turns SIGTERM/SIGINT (what schedulers send before pre-emption) and SIGUSR1 (what Slurm's --signal=USR1@N
    sends ahead of a time limit) into a stop, with a checkpoint, after the next step that syncs with the host
    (every `log_every` steps: at most a few seconds).

    A second SIGINT aborts at once, for a person at a terminal who means it."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop there
                pass

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


def count_nonfinite(
    records: list[dict], state: TrainerState, in_a_row: int, cfg: TrainConfig, checkpoint_dir: Path, logger: RunLogger
) -> int:
    """Mark skipped (non-finite) steps and count them; stop with an error after `max_nonfinite_steps` in a row.
    Returns the count of such steps in a row at the end of `records`."""
    for i, record in enumerate(records):
        if math.isfinite(record["grad_norm"]):
            in_a_row = 0
            continue
        state.skipped_steps += 1
        in_a_row += 1
        record["skipped"] = True
        if in_a_row >= cfg.max_nonfinite_steps:
            for done in records[: i + 1]:
                logger.log_step(done)
            good = list_checkpoints(checkpoint_dir)
            raise UserError(
                f"stopping: {in_a_row} steps in a row had a non-finite gradient norm (last at step "
                f"{record['step']}); the last good checkpoint is {good[-1][1] if good else 'none'}. "
                "Lower learning_rate or check the data."
            )
    return in_a_row


def resume(
    cfg: TrainConfig,
    accelerator: Accelerator,
    path: Path,
    model: GPTModel,
    optimizer,
    data_identity: dict,
    total_steps: int,
) -> tuple[TrainerState, dict | None, str]:
    """Load checkpoint `path` into the model and optimizer on every rank: returns where the run is, this rank's
    RNG state to restore just before the first step (None if it cannot map one to one) and a note for the console
    (for a run with nothing left to train, the line that says so)."""
    world_size, rank = accelerator.num_processes, accelerator.process_index
    saved = load_checkpoint(path, model, optimizer.optimizer)
    if accelerator.scaler is not None and "grad_scaler" in saved:  # fp16: keep the loss scale it had found
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    changed = [f"{k} {saved[k]} -> {v}" for k, v in data_identity.items() if k in saved and saved[k] != v]
    if changed:
        raise UserError(
            f"cannot resume from {path}: the data order would change ({', '.join(changed)}); "
            "resume with the settings it was saved with"
        )
    state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})
    if state.global_step >= total_steps:
        return state, None, complete_already(state.global_step, total_steps, path)  # raises if beyond the end
    note, rng_state = f" | resumed at step {state.global_step} from {path}", None
    if saved.get("total_steps", total_steps) != total_steps:
        note += f" (run length {saved['total_steps']} -> {total_steps} steps: the LR decay is re-stretched)"
    if saved["world_size"] == world_size:
        rng_state = load_rng_states(path)[rank]
    else:  # ranks do not map one to one: the data order carries over exactly, dropout masks cannot
        note += f" (saved by {saved['world_size']} processes: dropout RNG reseeded)"
        seed_rank(cfg.seed, rank, state.global_step)
    if accelerator.is_main_process and (moved := set_aside_newer(path.parent, state.global_step)):
        note += f" (later checkpoints of the abandoned run moved to {moved})"
    return state, rng_state, note


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the run directory and the last step's record. Runs on every rank."""
    accelerator, accumulation, global_batch = start_accelerator(cfg)
    world_size, rank = accelerator.num_processes, accelerator.process_index
    set_seed(cfg.seed)  # the same initial weights on every rank
    run = resolve_run_dirs(cfg, accelerator)  # before any work: unusable or occupied directories stop here
    output_dir, checkpoint_dir = run.output_dir, run.checkpoint_dir
    tokenizer = get_tokenizer(cfg.tokenizer)
    model_cfg = model_config_for(cfg, tokenizer)
    context_len = cfg.context_len or model_cfg.context_len  # training window; at most the position table
    if context_len > model_cfg.context_len:
        raise UserError(
            f"context_len {context_len} exceeds the position table of {cfg.init_from} ({model_cfg.context_len})"
        )
    eot_id = tokenizer.eot_token if cfg.special_token_id is None else cfg.special_token_id
    if not 0 <= eot_id < tokenizer.n_vocab:
        raise UserError(
            f"special_token_id {eot_id} is outside the {cfg.tokenizer} vocabulary (0..{tokenizer.n_vocab - 1})"
        )
    stride = cfg.stride or context_len
    data = build_data(cfg, load_token_streams(cfg, accelerator, eot_id), context_len, stride, global_batch)

    model = build_model(cfg, model_cfg)
    seed_rank(cfg.seed, rank)  # after the weights: from here on each rank draws its own dropout masks
    optimizer = build_optimizer(model, cfg)
    step_flops = flops_per_token(model, context_len) * global_batch * context_len
    device_peak = cfg.peak_flops or peak_flops(accelerator.device, accelerator.mixed_precision, cfg.token_cache_dir())
    attention = attention_backends(cfg.attention)
    if cfg.compile:
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    model, optimizer, train_loader, train_eval_loader, val_loader = accelerator.prepare(model, optimizer, *data.loaders)

    def raw_model() -> GPTModel:  # without DDP and torch.compile wrappers: plain parameter names
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    steps_per_epoch = data.train_sampler.steps_per_epoch
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    if cfg.warmup_steps >= total_steps:
        raise UserError(f"warmup_steps ({cfg.warmup_steps}) must be shorter than the run ({total_steps} steps)")

    # What fixes the order of global batches: a checkpoint's data position means nothing if any of these change.
    data_identity = {
        "global_batch_size": global_batch,
        "seed": cfg.seed,
        "context_len": context_len,
        "stride": stride,
        "train_windows": len(data.train_set),
    }
    state, rng_state, resume_note = TrainerState(), None, ""
    if run.resume_from is not None:
        state, rng_state, resume_note = resume(
            cfg, accelerator, run.resume_from, raw_model(), optimizer, data_identity, total_steps
        )
        if state.global_step == total_steps:  # a finished job requeued with --checkpoint auto: nothing to train
            if accelerator.is_main_process:
                print(resume_note, flush=True)
            accelerator.end_training()
            return {"output_dir": str(output_dir), "checkpoint_dir": str(checkpoint_dir), "world_size": world_size}

    resolved = (
        cfg.to_dict()
        | data_identity
        | {
            "output_dir": str(output_dir),
            "checkpoint_dir": str(checkpoint_dir),
            "gradient_accumulation_steps": accumulation,
        }
    )
    logger = RunLogger(output_dir, accelerator.is_main_process, total_steps, state.global_step, resolved, accelerator)
    # Under FSDP each process holds a shard: say how much, so the memory saving is visible.
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in raw_model().parameters())
    params = raw_model().num_parameters()
    shard_note = f", {held:,} held per process" if held != params else ""
    logger.info(
        f"accel_gpt | world_size {world_size} | {strategy_name(accelerator)} | device {accelerator.device} | "
        f"mixed_precision {accelerator.mixed_precision} | model {cfg.model} ({params:,} params{shard_note}) | "
        f"global batch {global_batch} = {cfg.batch_size} x {accumulation} accumulation x {world_size} "
        f"processes | {len(data.train_set):,} train / {len(data.val_set):,} val windows of {context_len} tokens | "
        f"{total_steps} steps{resume_note}"
    )

    def save() -> None:
        # Collectives (gathering shards and RNG states, barriers) run on every rank; only the main rank writes.
        states = full_state_dicts(raw_model(), optimizer.optimizer)
        rng_states = gather_object([capture_rng_state()])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            run_state = vars(state) | data_identity | {"world_size": world_size, "total_steps": total_steps}
            if accelerator.scaler is not None:  # fp16 only; its state is a handful of numbers
                run_state["grad_scaler"] = accelerator.scaler.state_dict()
            path = save_checkpoint(
                checkpoint_dir, state.global_step, model_cfg, states, run_state, cfg.to_dict(), rng_states
            )
            pruned = prune_checkpoints(checkpoint_dir, cfg.keep_last)
            logger.info(f"saved {path}" + (f" (pruned {', '.join(p.name for p in pruned)})" if pruned else ""))
        accelerator.wait_for_everyone()

    def evaluate_and_sample(record: dict) -> None:
        record["train_loss"] = evaluate(model, train_eval_loader, accelerator)
        record["val_loss"] = evaluate(model, val_loader, accelerator)
        # Under FSDP every rank decodes: each forward pass gathers shards from all of them.
        if accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP:
            logger.log_sample(
                state.global_step, generate_text(raw_model(), cfg.start_context, cfg.sample_tokens, tokenizer)
            )

    tokens_per_step = global_batch * context_len
    run_step = make_step(cfg, model, optimizer, accelerator, accumulation)
    log_every = cfg.log_every or (1 if accelerator.device.type == "cpu" else 10)
    window = StepWindow(accelerator, tokens_per_step, step_flops, device_peak)
    record: dict = {}
    nonfinite_in_a_row, stopping = 0, False
    stop = StopSignal()
    model.train()
    if rng_state is not None:  # last, so nothing between here and the first step draws from the restored streams
        restore_rng_state(rng_state)
    with attention:
        while state.global_step < total_steps and not stopping:
            data.train_sampler.set_position(state.epoch, state.step_in_epoch)
            batches = iter(train_loader)
            epoch_done = False
            while state.global_step < total_steps and not epoch_done and not stopping:
                lr = learning_rate_at(
                    state.global_step,
                    total_steps=total_steps,
                    warmup_steps=cfg.warmup_steps,
                    initial_lr=cfg.initial_lr,
                    learning_rate=cfg.learning_rate,
                    min_lr=cfg.min_lr,
                )
                max_norm = cfg.max_norm if clips_gradients_at(state.global_step, cfg.warmup_steps) else math.inf
                loss, grad_norm = run_step(batches, lr, max_norm)
                state.global_step += 1
                state.step_in_epoch += 1
                state.tokens_seen += tokens_per_step
                window.add(
                    {"step": state.global_step, "epoch": state.epoch, "tokens_seen": state.tokens_seen, "lr": lr},
                    loss,
                    grad_norm,
                )
                epoch_done = state.step_in_epoch == steps_per_epoch
                if epoch_done:  # checkpoints record the next step's position: the start of the next epoch
                    state.epoch += 1
                    state.step_in_epoch = 0
                last = state.global_step == total_steps
                eval_due = cfg.eval_freq > 0 and (state.global_step % cfg.eval_freq == 0 or last)
                save_due = state.global_step % cfg.save_freq == 0 or last
                if len(window) < log_every and not (eval_due or save_due):
                    continue
                records, stopping = window.flush(stop.received is not None)
                nonfinite_in_a_row = count_nonfinite(records, state, nonfinite_in_a_row, cfg, checkpoint_dir, logger)
                record = records[-1]
                if eval_due:
                    evaluate_and_sample(record)
                for done in records:
                    logger.log_step(done)
                if stopping or save_due:
                    save()
                if stopping:
                    how = (
                        "Rerun the same command to resume"
                        if cfg.checkpoint == "auto"
                        else f"Resume with the same command plus --output_dir {output_dir} --checkpoint latest"
                    )
                    logger.info(
                        f"received {stop.received or 'a stop signal on another rank'}: stopped after step "
                        f"{state.global_step} with a checkpoint. {how}"
                    )
                window.restart_clock()
    logger.close()
    accelerator.end_training()
    return {"output_dir": str(output_dir), "checkpoint_dir": str(checkpoint_dir), "world_size": world_size} | record


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_config(argv))
    except UserError as err:
        print(f"accel_gpt: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
