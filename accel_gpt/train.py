"""Pretraining: `setup` builds a run from its config (accelerator, data, model, optimizer, resume state, logger)
and `fit` is the loop, read top to bottom; `train` is the two, for the command line and for Python alike.

Run with `accelerate launch -m accel_gpt.train [--config FILE] [--key value ...]` (or plain `python -m`);
the launcher, not this code, decides between one CPU, gloo processes, GPUs and machines.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from accel_gpt.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    capture_rng_state,
    full_state_dicts,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    load_rng_states,
    load_stream_states,
    prune_checkpoints,
    read_trainer_state,
    restore_rng_state,
    save_checkpoint,
    set_aside_newer,
)
from accel_gpt.cli import run_command
from accel_gpt.config import TrainConfig, parse_config
from accel_gpt.data.run_data import RunData, load_training_data
from accel_gpt.errors import UserError
from accel_gpt.hf import load_hf_gpt2
from accel_gpt.inference import generate
from accel_gpt.launch import agree, launch_world_size, start_accelerator, strategy_name
from accel_gpt.memory import check_fits
from accel_gpt.metrics import RunLogger, StepWindow, flops_per_token, peak_flops
from accel_gpt.model import GPTModel, attention_backends
from accel_gpt.optim import apply_learning_rates, build_optimizer
from accel_gpt.plan import RunPlan, plan_run
from accel_gpt.rundir import RunDirs, complete_already, resolve_run_dirs
from accel_gpt.schedule import clips_gradients_at
from accel_gpt.step import make_step
from accel_gpt.tasks import evaluate_task
from accel_gpt.tokenizer import TOKENIZER_FILE, get_tokenizer, token_byte_lengths


@dataclass
class TrainerState:
    """Everything that says where a run is; saved in every checkpoint as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`: the data position, in world-size-free units
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite gradient norm

    def advance(self, tokens: int, steps_per_epoch: int) -> None:
        """Count one optimizer step. After an epoch's last step the position is the next epoch's start: what a
        checkpoint saved now must record."""
        self.global_step += 1
        self.step_in_epoch += 1
        self.tokens_seen += tokens
        if self.step_in_epoch == steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0


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


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """`model` with its own parameters whole for the body of the block: under FSDP2 the root's parameters (embedding,
    final norm, head) are gathered only by its forward, which task scoring does not call (the blocks gather their
    own as they run). Anything else as it is."""
    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield model
        finally:
            model.reshard()
    else:
        yield model


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Give this rank random streams of its own (dropout masks), derived from the run's seed, the rank and the
    step they start at: with one shared seed every DDP rank would draw the same masks."""
    set_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def build_model(plan: RunPlan) -> GPTModel:
    """The plan's model, initialised at random or from what `init_from` names (its weights alone)."""
    cfg, model_cfg = plan.cfg, plan.model_config
    if plan.init_checkpoint is not None:
        model = GPTModel(model_cfg)
        load_model_weights(model, plan.init_checkpoint / MODEL_FILE)
    else:
        model = load_hf_gpt2(cfg.init_from, model_cfg) if cfg.init_from else GPTModel(model_cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk
    model.document_boundary = plan.eot_id if cfg.document_mask else None
    return model


@dataclass
class Run:
    """A run ready to train: what `setup` built, and what `fit` and the pieces it calls read."""

    plan: RunPlan  # the checked config (plan.cfg) and everything derived from it and the data
    accelerator: Accelerator
    dirs: RunDirs
    model: torch.nn.Module  # as prepared: DDP/FSDP and torch.compile wrappers around the GPTModel
    optimizer: AcceleratedOptimizer
    data: RunData  # prepared with the model: training micro-batches step by step, and the evaluation loaders
    step_flops: float
    device_peak_flops: float | None
    memory: str  # what memory_check estimated, for the header
    state: TrainerState
    rng_state: dict | None = None  # resuming: this rank's RNG state, restored just before the first step
    logger: RunLogger | None = None  # None for a resumed run with nothing left to train
    bytes_per_token: dict[str, float] | None = None  # of each evaluation's windows' targets (`data.eval_loaders`)

    @property
    def steps_left(self) -> int:
        return self.plan.total_steps - self.state.global_step

    def raw_model(self) -> GPTModel:
        """The model without DDP and torch.compile wrappers: plain parameter names."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def save(self) -> None:
        """A checkpoint of this step. Collectives (gathering shards and RNG states, barriers) run on every rank;
        only the main rank writes."""
        accelerator, plan, state = self.accelerator, self.plan, self.state
        states = full_state_dicts(self.raw_model(), self.optimizer.optimizer)
        rng_states = gather_object([capture_rng_state()])
        data_positions = self.data.positions()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            run_state = vars(state) | plan.data_identity
            run_state |= {"world_size": accelerator.num_processes, "total_steps": plan.total_steps}
            run_state["optimizer"] = plan.cfg.optimizer
            run_state |= self.data.checkpoint_fields()
            if accelerator.scaler is not None:  # fp16 only; its state is a handful of numbers
                run_state["grad_scaler"] = accelerator.scaler.state_dict()
            path = save_checkpoint(
                self.dirs.checkpoint_dir, state.global_step, plan.model_config, states, run_state,
                plan.cfg.to_dict(), rng_states, data_positions, plan.tokenizer_files,
            )  # fmt: skip
            pruned = prune_checkpoints(self.dirs.checkpoint_dir, plan.cfg.keep_last)
            self.logger.info(f"saved {path}" + (f" (pruned {', '.join(p.name for p in pruned)})" if pruned else ""))
        accelerator.wait_for_everyone()

    def evaluate(self, record: dict) -> None:
        """Train and validation loss into `record` (a mixture's: each source's too), each also in bits per byte,
        and the tasks' scores."""
        loaders = self.data.eval_loaders
        losses = {name: evaluate(self.model, loader, self.accelerator) for name, loader in loaders.items()}
        record |= self.data.scores(losses, self.bytes_per_token)
        if self.plan.tasks:
            record |= self.score_tasks()

    def score_tasks(self) -> dict:
        """Each of `eval_tasks`' first `eval_task_limit` examples, shared out to the ranks and the counts summed:
        `<task>/acc`, and `<task>/acc_norm` or `<task>/perplexity`."""
        accelerator, plan = self.accelerator, self.plan
        tokenizer = get_tokenizer(plan.cfg.tokenizer)

        def reduce(counts: list[float]) -> list[float]:
            summed = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "sum")
            return summed.tolist()

        scores = {}
        with unsharded(self.raw_model()) as model:
            for task in plan.tasks:
                result = evaluate_task(
                    model, task, tokenizer, plan.eot_id, plan.cfg.eval_task_limit, accelerator.process_index,
                    accelerator.num_processes, reduce,
                )  # fmt: skip
                for metric in ("acc", "acc_norm", "perplexity"):
                    if metric in result:
                        scores[f"{task.name}/{metric}"] = result[metric]
        return scores

    def sample(self, stop: StopSignal) -> None:
        """A greedy sample into samples.jsonl. A stop signal ends it early (the loop then stops at its next sync);
        under FSDP every rank decodes, each forward pass gathering shards from all of them, so there every rank
        finishes the sample, lest one leave the others in a collective."""
        cfg, accelerator = self.plan.cfg, self.accelerator
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        if accelerator.is_main_process or fsdp:
            until = None if fsdp else lambda: stop.received is not None
            text = generate(
                self.raw_model(), cfg.start_context, cfg.sample_tokens, tokenizer=cfg.tokenizer, until=until
            )
            self.logger.log_sample(self.state.global_step, text)

    def log_failure(self) -> str | None:
        """The main process's failed log write, if any, known to every rank: one tiny all-reduce at each logging
        point when there are several processes (the message itself travels only when there is one)."""
        error, accelerator = self.logger.error, self.accelerator
        if accelerator.num_processes == 1:
            return error
        failed = torch.tensor([float(error is not None)], device=accelerator.device)
        return gather_object([error])[0] if accelerator.reduce(failed, reduction="sum").item() else None

    def summary(self) -> dict:
        dirs = self.dirs
        return {"output_dir": str(dirs.output_dir), "checkpoint_dir": str(dirs.checkpoint_dir),
                "world_size": self.accelerator.num_processes}  # fmt: skip

    def close(self) -> None:
        """Close the run's files and trackers, and give its directories up; also when the loop raised."""
        if self.logger is not None:
            self.logger.close()
        # DDP's reducer holds the process group in C++, and were it the last holder, its release would join gloo's
        # threads with the GIL held while one of them may need the GIL to free a finished collective's tensors: a
        # hang at exit, seen once in the suite. Released first, the group's last holder is torch's registry, whose
        # release (in end_training) gives the GIL up.
        self.model = None
        self.accelerator.free_memory()
        self.accelerator.end_training()
        self.dirs.release()


def setup(cfg: TrainConfig) -> Run:
    """Everything the loop needs, built in an order that keeps runs reproducible: the config checked, the
    directories, the tokens, the model (the same initial weights on every rank), the optimizer, then the resume."""
    plan = plan_run(cfg, launch_world_size())  # every bad value stops here, before any work
    accelerator = start_accelerator(plan.cfg, plan.gradient_accumulation_steps)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    memory = agree(accelerator, lambda: check_fits(plan, accelerator.device, accelerator.mixed_precision,
                                                   accelerator.num_processes if fsdp else 1))  # fmt: skip
    set_seed(plan.cfg.seed)  # the same initial weights on every rank
    dirs = resolve_run_dirs(plan.cfg, accelerator)  # unusable, occupied or live runs' directories stop here
    try:
        return build_run(plan, accelerator, dirs, memory[accelerator.process_index])
    except BaseException:
        dirs.release()  # a run that never started gives its directories up (a notebook may try again at once)
        raise


def build_run(plan: RunPlan, accelerator: Accelerator, dirs: RunDirs, memory: str) -> Run:
    """`setup` once the directories are the run's: the data, the model, the optimizer, the resume, the logger."""
    cfg = plan.cfg
    data = load_training_data(plan, accelerator)
    plan = data.plan
    model = build_model(plan)
    seed_rank(cfg.seed, accelerator.process_index)  # after the weights: from here on each rank draws its own masks
    optimizer = build_optimizer(model, cfg)
    step_flops = flops_per_token(model, plan.context_len) * plan.tokens_per_step
    device_peak = cfg.peak_flops or peak_flops(accelerator.device, accelerator.mixed_precision, cfg.token_cache_dir())
    if cfg.compile:
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    model, optimizer = data.prepare(accelerator, model, optimizer)
    run = Run(
        plan, accelerator, dirs, model, optimizer, data, step_flops, device_peak, memory, TrainerState(),
        bytes_per_token=data.bytes_per_token(token_byte_lengths(cfg.tokenizer)),
    )  # fmt: skip
    note = ""
    if dirs.resume_from is not None:
        run.state, run.rng_state, note = resume(run, dirs.resume_from)
    elif cfg.init_from:
        note = f" | initialised from {cfg.init_from}: its weights alone (a fresh optimizer, schedule and data order)"
    if not run.steps_left:  # a finished job requeued with --checkpoint auto: nothing to train
        if accelerator.is_main_process:
            print(note, flush=True)
        return run
    dirs.set_aside_earlier_run(accelerator)  # the data and the model are checked: nothing can refuse the run now
    run.logger = open_logger(run, note)
    return run


def open_logger(run: Run, resume_note: str) -> RunLogger:
    """The run's logger, after config.yaml and the header line that says what this launch trains, and how."""
    plan, accelerator, dirs, cfg = run.plan, run.accelerator, run.dirs, run.plan.cfg
    resolved = cfg.to_dict() | plan.data_identity | {
        "output_dir": str(dirs.output_dir), "checkpoint_dir": str(dirs.checkpoint_dir),
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
    }  # fmt: skip
    logger = RunLogger(
        dirs.output_dir, accelerator.is_main_process, plan.total_steps, run.state.global_step, resolved, accelerator
    )
    # Under FSDP each process holds a shard: say how much (its share of the vocabulary padding rows included), so
    # the memory saving is visible.
    model = run.raw_model()
    params, shard_note = model.num_parameters(), ""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        shard_note = f", {held:,} held per process"
    world_size = accelerator.num_processes
    length = f"{plan.total_steps} steps" + (f" = {plan.token_budget}" if plan.token_budget else "")
    if plan.steps_per_epoch:  # the epochs that many steps make, when that is not what num_epochs says
        epochs = plan.total_steps / plan.steps_per_epoch
        length += f" ({epochs:.3g} epochs of {plan.steps_per_epoch})" if epochs != cfg.num_epochs else ""
    logger.info(
        f"accel_gpt | world_size {world_size} | {strategy_name(accelerator)} | device {accelerator.device} | "
        f"mixed_precision {accelerator.mixed_precision} | model {plan.model_name} ({params:,} params{shard_note}) | "
        f"global batch {plan.global_batch_size} = {cfg.batch_size} x {plan.gradient_accumulation_steps} "
        f"accumulation x {world_size} processes | {run.data.description} of {plan.context_len} tokens | {length} | "
        f"{run.memory}"
        f"{resume_note}"
    )
    return logger


def check_optimizer(saved: dict, path: Path, plan: RunPlan) -> None:
    """Refuse, in one line and before any state is loaded, to resume checkpoint `path` (its trainer state `saved`)
    with another optimizer, whose state it does not hold."""
    if (trained_with := saved.get("optimizer", "adamw")) != plan.cfg.optimizer:
        raise UserError(
            f"cannot resume {path} with optimizer {plan.cfg.optimizer}: it was trained with {trained_with}, whose "
            "state it holds; resume with that optimizer (or start a new run from its weights)"
        )


def check_tokenizer(saved: dict, path: Path, plan: RunPlan) -> None:
    """Refuse, in one line and before any weight is loaded, to resume checkpoint `path` with another tokenizer than
    the one it was trained with (its ids would mean other text)."""
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("train", {})
    trained_with = saved.get("tokenizer", config.get("tokenizer", "gpt2"))  # earlier versions recorded the name
    if trained_with != plan.tokenizer_id:
        carried = f" (the checkpoint carries it: --tokenizer {path})" if (path / TOKENIZER_FILE).is_file() else ""
        raise UserError(
            f"cannot resume {path} with tokenizer {plan.cfg.tokenizer}: it was trained with tokenizer "
            f"{config.get('tokenizer', 'gpt2')} ({trained_with[:19]}); resume with that one{carried}"
        )


def resume(run: Run, path: Path) -> tuple[TrainerState, dict | None, str]:
    """Load checkpoint `path` into the model and optimizer on every rank: returns where the run is, this rank's
    RNG state to restore just before the first step (None if it cannot map one to one) and a note for the console
    (for a run with nothing left to train, the line that says so)."""
    accelerator, plan, total_steps = run.accelerator, run.plan, run.plan.total_steps
    world_size, rank = accelerator.num_processes, accelerator.process_index
    saved_state = read_trainer_state(path)
    check_optimizer(saved_state, path, plan)
    check_tokenizer(saved_state, path, plan)
    saved = load_checkpoint(path, run.raw_model(), run.optimizer.optimizer)
    apply_learning_rates(run.optimizer, plan.cfg)
    run.data.check_resume(saved, path, world_size)
    if accelerator.scaler is not None and "grad_scaler" in saved:  # fp16: keep the loss scale it had found
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})
    run.data.load_positions(load_stream_states(path))
    if state.global_step >= total_steps:
        return state, None, complete_already(state.global_step, total_steps, path)  # raises if beyond the end
    note, rng_state = f" | resumed at step {state.global_step} from {path}", None
    if saved.get("total_steps", total_steps) != total_steps:
        note += f" (run length {saved['total_steps']} -> {total_steps} steps: the LR decay is re-stretched)"
    if saved["world_size"] == world_size:
        rng_state = load_rng_states(path)[rank]
    else:  # ranks do not map one to one: the data order carries over exactly, dropout masks cannot
        note += f" (saved by {saved['world_size']} processes: dropout RNG reseeded)"
        seed_rank(plan.cfg.seed, rank, state.global_step)
    if accelerator.is_main_process and (moved := set_aside_newer(path.parent, state.global_step)):
        note += f" (later checkpoints of the abandoned run moved to {moved})"
    return state, rng_state, note


def count_nonfinite(run: Run, records: list[dict], in_a_row: int) -> int:
    """Mark skipped (non-finite) steps and count them; stop with an error after `max_nonfinite_steps` in a row.
    Returns the count of such steps in a row at the end of `records`."""
    for i, record in enumerate(records):
        if math.isfinite(record["grad_norm"]):
            in_a_row = 0
            continue
        run.state.skipped_steps += 1
        in_a_row += 1
        record["skipped"] = True
        if in_a_row >= run.plan.cfg.max_nonfinite_steps:
            for done in records[: i + 1]:
                run.logger.log_step(done)
            good = list_checkpoints(run.dirs.checkpoint_dir)
            raise UserError(
                f"stopping: {in_a_row} steps in a row had a non-finite gradient norm (last at step "
                f"{record['step']}); the last good checkpoint is {good[-1][1] if good else 'none'}. "
                "Lower learning_rate or check the data."
            )
    return in_a_row


class StopSignal:
    """Turns SIGTERM/SIGINT (what schedulers send before pre-emption) and SIGUSR1 (what Slurm's --signal=USR1@N
    sends ahead of a time limit) into a stop, with a checkpoint, after the next step that syncs with the host
    (every `log_every` steps: at most a few seconds). A second SIGINT aborts at once, for a person at a terminal
    who means it. A context manager: the handlers that were there before come back when the loop ends or
    raises, so a notebook's Ctrl-C and SIGTERM work as before `train()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __enter__(self) -> StopSignal:
        self.received: str | None = None
        self.previous = {}
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop there
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is the nearest.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def stop_line(self, step: int, cfg: TrainConfig, output_dir: Path) -> str:
        received = self.received or "a stop signal on another rank"
        return f"received {received}: stopped after step {step} with a checkpoint. {how_to_resume(cfg, output_dir)}"


def how_to_resume(cfg: TrainConfig, output_dir: Path) -> str:
    if cfg.checkpoint == "auto":
        return "Rerun the same command to resume"
    return f"Resume with the same command plus --output_dir {output_dir} --checkpoint latest"


def fit(run: Run) -> dict:
    """The training loop: from the run's position to its last step, or to a stop signal. Step values stay on
    the device between syncs with the host (every log_every steps, and at evaluations and saves); at each sync
    come the records, the non-finite check, evaluation and sample, logging and the checkpoint."""
    plan, cfg, state, logger = run.plan, run.plan.cfg, run.state, run.logger
    run_step = make_step(cfg, run.model, run.optimizer, run.accelerator, plan.gradient_accumulation_steps)
    log_every = cfg.log_every or (1 if run.accelerator.device.type == "cpu" else 10)
    window = StepWindow(run.accelerator, plan.tokens_per_step, run.step_flops, run.device_peak_flops)
    record, nonfinite_in_a_row = {}, 0
    run.model.train()
    if run.rng_state is not None:  # last, so nothing between here and the first step draws from the restored streams
        restore_rng_state(run.rng_state)
    with attention_backends(cfg.attention), StopSignal() as stop:
        for batches in run.data.steps(state, plan.total_steps):
            lr = plan.learning_rate_at(state.global_step)
            max_norm = cfg.max_norm if clips_gradients_at(state.global_step, cfg.warmup_steps) else math.inf
            loss, grad_norm = run_step(batches, lr, max_norm)
            epoch = state.epoch  # the step's own; advance() may move the position on to the next epoch
            state.advance(plan.tokens_per_step, plan.steps_per_epoch)
            window.add(
                {"step": state.global_step, "epoch": epoch, "tokens_seen": state.tokens_seen, "lr": lr}
                | run.data.progress(state.global_step),
                loss,
                grad_norm,
            )
            last = state.global_step == plan.total_steps
            eval_due = cfg.eval_freq > 0 and (state.global_step % cfg.eval_freq == 0 or last)
            save_due = state.global_step % cfg.save_freq == 0 or last
            if len(window) < log_every and not (eval_due or save_due):
                continue
            data_error = run.data.error  # bad data met by this rank, held for this sync
            records, stopping = window.flush(stop.received is not None or data_error is not None)
            if stopping and (errors := [e for e in gather_object([data_error]) if e]):
                raise UserError(errors[0])  # on every rank, saving nothing: the last checkpoint is good
            nonfinite_in_a_row = count_nonfinite(run, records, nonfinite_in_a_row)
            record = records[-1]
            if eval_due:
                run.evaluate(record)
            for done in records:
                logger.log_step(done)
            if (log_error := run.log_failure()) is not None:
                save_after_log_failure(run, log_error)
            if stopping or save_due:
                run.save()
            if stopping:
                logger.info(stop.stop_line(state.global_step, cfg, run.dirs.output_dir))
                break
            if eval_due:  # after the step's checkpoint: however long a sample takes, the steps before it are saved
                run.sample(stop)
            window.restart_clock()
    return record


def save_after_log_failure(run: Run, log_error: str) -> NoReturn:
    """Stop every rank on a log write that failed, such as on a full disk: the run still tries a checkpoint of the
    step whose records could not be written, so a resume continues after it."""
    step = run.state.global_step
    try:
        run.save()
    except UserError as err:
        raise UserError(f"{log_error}; the checkpoint of step {step} could not be written either ({err})") from None
    how = how_to_resume(run.plan.cfg, run.dirs.output_dir)
    raise UserError(f"{log_error}; saved a checkpoint of step {step}. {how} once it can write")


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says, checked exactly as the command line is (a bad value is one UserError naming it);
    returns the run's directories, world size and the last step's record. Runs on every rank."""
    run = setup(cfg)
    try:
        record = fit(run) if run.steps_left else {}
        run.accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
    except BaseException as err:
        # The loop's frames, kept by the traceback, hold the step and through it the DDP model: cleared, so that
        # close() can release the model before the process group (the hang at exit it explains).
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        run.close()
    return run.summary() | record


def main(argv: list[str] | None = None) -> None:
    run_command(lambda: train(parse_config(argv)))


if __name__ == "__main__":
    main()
