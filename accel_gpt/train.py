"""The training loop: wires config, data, model, schedule, checkpoints and logging together on Accelerate.

Run with `accelerate launch -m accel_gpt.train [--config FILE] [--key value ...]` (or plain `python -m`);
the launcher, not this code, decides between one CPU, gloo processes, GPUs and machines.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    gather_object,
    parse_flag_from_env,
    set_seed,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from accel_gpt.checkpoint import (
    capture_rng_state,
    find_checkpoint,
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
from accel_gpt.metrics import RunLogger, flops_per_token, peak_flops, peak_memory_mib
from accel_gpt.model import GPTModel, generate_text
from accel_gpt.schedule import clips_gradients_at, learning_rate_at
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


def resolve_run_dirs(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Path, Path]:
    output_dir = cfg.output_dir
    if output_dir is None:  # one timestamp for all ranks, chosen by the main process
        stamp = [f"runs/{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"]
        broadcast_object_list(stamp)
        output_dir = stamp[0]
    checkpoint_dir = cfg.checkpoint_dir or str(Path(output_dir) / "checkpoints")
    return Path(output_dir), Path(checkpoint_dir)


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
    """Mean loss over this rank's eval batches, then over all ranks."""
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


def strategy_name(accelerator: Accelerator) -> str:
    """How the run is spread, for the console: one process, DDP or FSDP, with the collective backend."""
    kind, backend = accelerator.distributed_type, accelerator.state.backend
    if kind == DistributedType.NO:
        return "one process"
    if kind == DistributedType.FSDP:
        return f"FSDP ({backend})"
    return f"DDP ({backend})" if kind.value.startswith("MULTI_") else kind.value


def load_token_streams(cfg: TrainConfig, accelerator: Accelerator, eot_id: int) -> tuple[TokenStream, TokenStream]:
    with accelerator.local_main_process_first():  # one rank per machine tokenizes; the others hit its cache
        train = tokenize_corpus(cfg.train_data_path, cfg.tokenizer, eot_id, cfg.data_cache_dir, cfg.num_proc)[0]
        if cfg.val_data_path is not None:
            val = tokenize_corpus(cfg.val_data_path, cfg.tokenizer, eot_id, cfg.data_cache_dir, cfg.num_proc,
                                  role="validation")[0]
            return train, val
    split = int(len(train) * (1.0 - cfg.val_fraction))
    return train.view(0, split), train.view(split, len(train))


@dataclass
class RunData:
    train_set: WindowDataset
    val_set: WindowDataset
    train_sampler: GlobalBatchSampler
    loaders: tuple[DataLoader, DataLoader, DataLoader]  # train, train-eval, val (unprepared)


def build_data(cfg: TrainConfig, streams, context_len: int, stride: int, global_batch: int, world_size: int) -> RunData:
    train_set, val_set = (WindowDataset(s, context_len, stride) for s in streams)
    train_sampler = GlobalBatchSampler(len(train_set), cfg.batch_size, global_batch, seed=cfg.seed)
    if train_sampler.steps_per_epoch == 0:
        raise UserError(
            f"training data has {len(train_set)} windows of {context_len + 1} tokens; one optimizer step needs "
            f"{global_batch} (lower batch_size/context_len or add text)"
        )
    # Evaluation reads the first eval_iter batches per rank in corpus order: the same windows every time.
    eval_batch = cfg.batch_size * world_size
    train_eval, val_eval = (
        GlobalBatchSampler(len(ds), cfg.batch_size, eval_batch, shuffle=False, max_steps_per_epoch=cfg.eval_iter)
        for ds in (train_set, val_set)
    )
    if val_eval.steps_per_epoch == 0:
        raise UserError(
            f"validation data has {len(val_set)} windows of {context_len + 1} tokens; an evaluation batch needs "
            f"{eval_batch} (raise val_fraction, add validation text or lower batch_size)"
        )
    loaders = (make_loader(train_set, train_sampler), make_loader(train_set, train_eval), make_loader(val_set, val_eval))
    return RunData(train_set, val_set, train_sampler, loaders)


def optimizer_step(model, optimizer, batches, accelerator: Accelerator, accumulation: int, max_norm: float):
    """Forward/backward over `accumulation` micro-batches, then one update unless the gradient norm is not finite.

    Returns (this rank's mean loss, gradient norm). The norm is taken after the all-reduce, so every rank makes
    the same skip decision."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accumulation):
        inputs, targets = next(batches)
        with accelerator.accumulate(model):  # gradient all-reduce only on the last micro-batch
            loss = model(inputs, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                if isinstance(grad_norm, DTensor):  # FSDP: a replicated norm; the optimizer wants a plain tensor
                    grad_norm = grad_norm.full_tensor()
                optimizer.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # fused AdamW skips if set
            optimizer.step()  # a no-op until the last micro-batch
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
    return loss_sum / accumulation, grad_norm


class StopSignal:
    """Turns SIGTERM/SIGINT (what schedulers send before pre-emption) into a stop at the next step boundary.

    A second SIGINT aborts at once, for a person at a terminal who means it."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop there
                pass

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


def set_cpu_threads(cfg: TrainConfig) -> None:
    # `accelerate launch` pins OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core laptop's speed.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cfg.cpu_threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the run directory and the last step's record. Runs on every rank."""
    world_size = PartialState(cpu=use_cpu()).num_processes
    accumulation, global_batch = batch_geometry(cfg, world_size)
    accelerator = Accelerator(cpu=use_cpu(), gradient_accumulation_steps=accumulation)
    enable_fsdp_on_cpu(accelerator)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg)
    set_seed(cfg.seed)
    output_dir, checkpoint_dir = resolve_run_dirs(cfg, accelerator)
    tokenizer = get_tokenizer(cfg.tokenizer)
    if cfg.init_from:
        model_cfg = read_hf_gpt2_config(cfg.init_from, cfg.dropout)
        if model_cfg.vocabulary_size != tokenizer.n_vocab:
            raise UserError(f"init_from model has {model_cfg.vocabulary_size} tokens, the {cfg.tokenizer} tokenizer {tokenizer.n_vocab}")
    else:
        model_cfg = cfg.model_config(tokenizer.n_vocab)
    context_len = cfg.context_len or model_cfg.context_len  # training window; at most the position table
    if context_len > model_cfg.context_len:
        raise UserError(f"context_len {context_len} exceeds the position table of {cfg.init_from} ({model_cfg.context_len})")
    eot_id = tokenizer.eot_token if cfg.special_token_id is None else cfg.special_token_id
    if not 0 <= eot_id < tokenizer.n_vocab:
        raise UserError(f"special_token_id {eot_id} is outside the {cfg.tokenizer} vocabulary (0..{tokenizer.n_vocab - 1})")
    stride = cfg.stride or context_len
    data = build_data(cfg, load_token_streams(cfg, accelerator, eot_id), context_len, stride, global_batch, world_size)

    if accelerator.device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = load_hf_gpt2(cfg.init_from, model_cfg) if cfg.init_from else GPTModel(model_cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk
    optimizer = build_optimizer(model, cfg)
    step_flops = flops_per_token(model, context_len) * global_batch * context_len
    device_peak = cfg.peak_flops or peak_flops(accelerator.device, accelerator.mixed_precision)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, train_eval_loader, val_loader = accelerator.prepare(model, optimizer, *data.loaders)

    def raw_model() -> GPTModel:  # without DDP and torch.compile wrappers: plain parameter names
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    steps_per_epoch = data.train_sampler.steps_per_epoch
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    if cfg.warmup_steps >= total_steps:
        raise UserError(f"warmup_steps ({cfg.warmup_steps}) must be shorter than the run ({total_steps} steps)")

    # What fixes the order of global batches: a checkpoint's data position means nothing if any of these change.
    data_identity = {
        "global_batch_size": global_batch, "seed": cfg.seed, "context_len": context_len, "stride": stride,
        "train_windows": len(data.train_set),
    }
    state, rng_state, resume_note = TrainerState(), None, ""
    if cfg.checkpoint is not None:
        found = [find_checkpoint(checkpoint_dir, cfg.checkpoint) if accelerator.is_main_process else None]
        broadcast_object_list(found)  # only the main rank reads and hashes the files to pick one
        path = found[0]
        saved = load_checkpoint(path, raw_model(), optimizer.optimizer)
        if accelerator.scaler is not None and "grad_scaler" in saved:  # fp16: keep the loss scale it had found
            accelerator.scaler.load_state_dict(saved["grad_scaler"])
        changed = [f"{k} {saved[k]} -> {v}" for k, v in data_identity.items() if k in saved and saved[k] != v]
        if changed:
            raise UserError(
                f"cannot resume from {path}: the data order would change ({', '.join(changed)}); "
                "resume with the settings it was saved with"
            )
        state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})
        resume_note = f" | resumed at step {state.global_step} from {path}"
        if saved.get("total_steps", total_steps) != total_steps:
            resume_note += f" (run length {saved['total_steps']} -> {total_steps} steps: the LR decay is re-stretched)"
        if saved["world_size"] == world_size:
            rng_state = load_rng_states(path)[accelerator.process_index]
        else:  # ranks do not map one to one: the data order carries over exactly, dropout masks cannot
            resume_note += f" (saved by {saved['world_size']} processes: dropout RNG reseeded)"
            set_seed(cfg.seed + state.global_step)
        if accelerator.is_main_process and (moved := set_aside_newer(checkpoint_dir, state.global_step)):
            resume_note += f" (later checkpoints of the abandoned run moved to {moved})"

    logger = RunLogger(output_dir, accelerator.is_main_process, total_steps, state.global_step)
    if accelerator.is_main_process:
        resolved = cfg.to_dict() | data_identity | {
            "output_dir": str(output_dir), "checkpoint_dir": str(checkpoint_dir),
            "gradient_accumulation_steps": accumulation,
        }
        (output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
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

    record: dict = {}
    nonfinite_in_a_row = stops = 0
    stop = StopSignal()
    tokens_per_step = global_batch * context_len
    model.train()
    if rng_state is not None:  # last, so nothing between here and the first step draws from the restored streams
        restore_rng_state(rng_state)
    while state.global_step < total_steps:
        data.train_sampler.set_position(state.epoch, state.step_in_epoch)
        batches = iter(train_loader)
        epoch_done = False
        while state.global_step < total_steps and not epoch_done:
            started = time.perf_counter()
            lr = learning_rate_at(
                state.global_step, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                initial_lr=cfg.initial_lr, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            max_norm = cfg.max_norm if clips_gradients_at(state.global_step, cfg.warmup_steps) else math.inf
            loss, grad_norm = optimizer_step(model, optimizer, batches, accelerator, accumulation, max_norm)
            # One collective carries the loss and whether any rank was asked to stop.
            stop_flag = torch.tensor(float(stop.received is not None), device=accelerator.device)
            loss_sum, stops = accelerator.reduce(torch.stack([loss, stop_flag]), reduction="sum").tolist()
            grad_norm = grad_norm.item()  # after the update was queued: the step's one host sync is above
            state.global_step += 1
            state.step_in_epoch += 1
            state.tokens_seen += tokens_per_step
            seconds = time.perf_counter() - started
            record = {
                "step": state.global_step, "epoch": state.epoch, "tokens_seen": state.tokens_seen, "lr": lr,
                "loss": loss_sum / world_size, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_step / seconds,
                "step_time": seconds, "peak_memory_mib": peak_memory_mib(accelerator.device),
            }
            if device_peak:
                record["mfu"] = step_flops / seconds / (device_peak * world_size)
            if not math.isfinite(grad_norm):
                state.skipped_steps += 1
                nonfinite_in_a_row += 1
                record["skipped"] = True
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    logger.log_step(record, total_steps)
                    good = list_checkpoints(checkpoint_dir)
                    raise UserError(
                        f"stopping: {nonfinite_in_a_row} steps in a row had a non-finite gradient norm (last at step "
                        f"{state.global_step}); the last good checkpoint is "
                        f"{good[-1][1] if good else 'none'}. Lower learning_rate or check the data."
                    )
            else:
                nonfinite_in_a_row = 0
            if state.global_step % cfg.eval_freq == 0 or state.global_step == total_steps:
                record["train_loss"] = evaluate(model, train_eval_loader, accelerator)
                record["val_loss"] = evaluate(model, val_loader, accelerator)
                # Under FSDP every rank decodes: each forward pass gathers shards from all of them.
                if accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP:
                    sample = generate_text(raw_model(), cfg.start_context, cfg.sample_tokens, tokenizer)
                    logger.log_sample(state.global_step, sample)
            logger.log_step(record, total_steps)
            epoch_done = state.step_in_epoch == steps_per_epoch
            if epoch_done:  # checkpoints record the next step's position: the start of the next epoch
                state.epoch += 1
                state.step_in_epoch = 0
            if stops or state.global_step % cfg.save_freq == 0 or state.global_step == total_steps:
                save()
            if stops:
                logger.info(
                    f"received {stop.received or 'a stop signal on another rank'}: stopped after step "
                    f"{state.global_step} with a checkpoint. Resume with the same command plus "
                    f"--output_dir {output_dir} --checkpoint latest"
                )
                break
        if stops:
            break
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
