"""What a run will do, derived once from its checked config and the launch's world size: the batch geometry, the
model's shape, the window, the end-of-text id and, once the data is tokenized, the run's length.

`plan_run` is the one validation point: every bad value is a UserError here, before any tokenizing or model
building; only what needs the data (`RunPlan.with_data`) or the device (`step.check_cuda_graph`) waits for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env

from accel_gpt.checkpoint import CONFIG_FILE
from accel_gpt.config import MODEL_SHAPE_OPTIONS, TrainConfig, validate
from accel_gpt.errors import UserError
from accel_gpt.hf import read_hf_gpt2_config
from accel_gpt.inference import accel_gpt_checkpoint
from accel_gpt.model import PRESETS, GPTConfig, GPTModel, context_limit
from accel_gpt.schedule import learning_rate_at
from accel_gpt.tasks import Task, load_tasks
from accel_gpt.tokenizer import carried_files, get_tokenizer, tokenizer_id


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig  # validated: every value in its field's type and range
    world_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # windows per optimizer step = batch_size x accumulation x world_size
    model_config: GPTConfig
    context_len: int  # tokens per training window; at most the model's position table
    stride: int  # tokens between window starts
    eot_id: int  # appended after every document
    init_checkpoint: Path | None  # the accel_gpt checkpoint that init_from names (None: a preset or an HF folder)
    max_steps: int | None = None  # max_steps, or the steps that train_tokens or tokens_per_parameter ask for
    token_budget: str = ""  # where a token budget set max_steps: what it asked for, for the header line
    # Known once the data is tokenized (`with_data`); 0 before.
    train_windows: int = 0
    steps_per_epoch: int = 0  # 0 when streaming: the stream has no epochs of a known length
    total_steps: int = 0
    stream_source: str = ""  # streaming: what is read, e.g. "Salesforce/wikitext (2 shards, column text)"
    held_out: tuple[int, ...] = (
        0,
        0,
        0,
    )  # streaming: where training's stream starts after a held-out slice (each source's)
    stream_files: list = dataclasses.field(default_factory=list)  # streaming: what identifies its files, for resumes
    tasks: tuple[Task, ...] = ()  # eval_tasks, read and checked
    tokenizer_id: str = "gpt2"  # what identifies the tokenizer's tokens (`tokenizer.tokenizer_id`)
    # A tokenizer folder's files as the run starts, which every checkpoint carries: read once, so a folder changed
    # during the run never reaches its checkpoints (`tokenizer.carried_files`).
    tokenizer_files: dict = dataclasses.field(default_factory=dict)
    mixture: tuple = ()  # a mixture's sources: (name, weight, training windows) each, in the config's order

    @property
    def model_name(self) -> str:
        """The model as the user named it, for messages: its preset, or where its weights come from."""
        return f"from {self.cfg.init_from}" if self.cfg.init_from else self.cfg.model

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.context_len

    @property
    def data_identity(self) -> dict:
        """What fixes the order of global batches: a checkpoint's data position means nothing if any of these
        change, so a resume refuses that."""
        identity = {
            "global_batch_size": self.global_batch_size,
            "seed": self.cfg.seed,
            "context_len": self.context_len,
            "stride": self.stride,
            "train_windows": self.train_windows,
            "tokenizer": self.tokenizer_id,
        }
        if self.cfg.align_documents:  # windows packed from documents, not cut every stride tokens
            identity["align_documents"] = True
        if self.mixture:  # which source each step's windows come from
            identity["mixture"] = [list(source) for source in self.mixture]
        if self.cfg.streaming:  # each process's readers carry on from their own positions: the same processes
            identity |= {
                "streaming": True, "world_size": self.world_size, "stream_workers": self.cfg.stream_workers,
                "shuffle_buffer": self.cfg.shuffle_buffer, "stream_source": self.stream_source,
                "held_out": list(self.held_out),
            }  # fmt: skip
        return identity

    def learning_rate_at(self, step: int) -> float:
        """The schedule's rate at 0-based optimizer step `step` (AdamW's; Muon's groups scale it)."""
        cfg = self.cfg
        return learning_rate_at(
            step, total_steps=self.total_steps, warmup_steps=cfg.warmup_steps, initial_lr=cfg.initial_lr,
            learning_rate=cfg.learning_rate, min_lr=cfg.min_lr, schedule=cfg.lr_schedule,
            decay_fraction=cfg.decay_fraction, wsd_decay=cfg.wsd_decay,
        )  # fmt: skip

    def with_data(self, train_windows: int, val_windows: int) -> RunPlan:
        """The plan for data of this many training and validation windows, or the line saying why it cannot train."""
        steps_per_epoch = train_windows // self.global_batch_size
        window, batch = self.context_len + 1, self.global_batch_size
        if steps_per_epoch == 0:
            raise UserError(
                f"training data has {train_windows} windows of {window} tokens; one optimizer step needs "
                f"{batch} (lower batch_size/context_len or add text)"
            )
        self.check_validation(val_windows, "raise val_fraction, add validation text or lower batch_size")
        total_steps = self.max_steps or self.cfg.num_epochs * steps_per_epoch
        check_warmup(self.cfg.warmup_steps, total_steps)
        return dataclasses.replace(
            self, train_windows=train_windows, steps_per_epoch=steps_per_epoch, total_steps=total_steps
        )

    def with_mixture(self, sources: list[tuple]) -> RunPlan:
        """The plan for a mixture: `sources` holds each source's spec, training and validation windows. Its length
        is `max_steps` (`validate` checks it has one): its sources run out at different steps."""
        for source, train_windows, val_windows in sources:
            if train_windows == 0:
                raise UserError(
                    f"source {source.name} ({source.spec}) has no training window of {self.context_len + 1} tokens "
                    "(add text or lower context_len)"
                )
            hint = "add validation text (a val_path), raise val_fraction or lower batch_size"
            self.check_validation(val_windows, hint, f"source {source.name}'s validation data")
        check_warmup(self.cfg.warmup_steps, self.max_steps)
        mixture = tuple((source.name, source.weight, windows) for source, windows, _ in sources)
        train_windows = sum(windows for _, windows, _ in sources)
        return dataclasses.replace(self, train_windows=train_windows, total_steps=self.max_steps, mixture=mixture)

    def with_stream(
        self, train_eval_windows: int, val_windows: int, source: str, held_out: tuple[int, ...], files: list,
        who: str = "",
    ) -> RunPlan:  # fmt: skip
        """The plan for a streaming run (`max_steps` long: `validate` checks it has a length) reading `source` (its
        `files`, as `streaming.files_fingerprint` identifies them) from `held_out`, with this many windows in its
        fixed evaluation slices; `who` names a mixture's source in messages."""
        if train_eval_windows < self.global_batch_size:
            held = any(held_out)
            raise UserError(
                f"{who}training data has {train_eval_windows} windows of {self.context_len + 1} tokens"
                f"{' after the held-out validation slice' if held else ''}; an evaluation needs one "
                f"global batch of {self.global_batch_size} (add text, give validation data or lower batch_size)"
            )
        self.check_validation(
            val_windows, "add validation text, or lower eval_iter or batch_size", f"{who}validation data"
        )
        return dataclasses.replace(
            self, total_steps=self.max_steps, stream_source=source, held_out=held_out, stream_files=files
        )

    def check_validation(self, val_windows: int, hint: str, role: str = "validation data") -> None:
        if val_windows < self.global_batch_size:  # an evaluation reads whole global batches, like a step
            raise UserError(
                f"{role} has {val_windows} windows of {self.context_len + 1} tokens; an evaluation needs "
                f"one global batch of {self.global_batch_size} ({hint})"
            )


def check_warmup(warmup_steps: int, total_steps: int, budget: str = "") -> None:
    """`budget`: what a token budget asked for, where one set the run's length (`steps_for_tokens`)."""
    if warmup_steps >= total_steps:
        asked = f": {budget}" if budget else ""
        raise UserError(f"warmup_steps ({warmup_steps}) must be shorter than the run ({total_steps} steps{asked})")


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


def model_config_for(cfg: TrainConfig, vocabulary_size: int) -> tuple[GPTConfig, Path | None]:
    """The preset with the config's shape options on top; or the shape of what `init_from` names (an accel_gpt
    checkpoint or run directory, whose checkpoint comes back too, or a Hugging Face GPT-2 folder), where a shape
    option may only repeat it."""
    if not cfg.init_from:
        return cfg.model_config(vocabulary_size), None
    trained_with = "GPT-2's"  # a Hugging Face GPT-2 folder's
    if (checkpoint := accel_gpt_checkpoint(cfg.init_from)) is not None:
        config = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        trained_with = config.get("train", {}).get("tokenizer", "gpt2")
        model_cfg = GPTConfig(**config["model"] | {"vocab_multiple": cfg.vocab_multiple})
        if cfg.dropout is not None:
            model_cfg = dataclasses.replace(model_cfg, dropout=cfg.dropout)
    else:
        model_cfg = read_hf_gpt2_config(cfg.init_from, cfg.dropout, cfg.vocab_multiple)
    if model_cfg.vocabulary_size != vocabulary_size:
        raise UserError(
            f"init_from {cfg.init_from} has a vocabulary of {model_cfg.vocabulary_size} tokens (tokenizer "
            f"{trained_with}), tokenizer {cfg.tokenizer} one of {vocabulary_size}: start from a model of this "
            "tokenizer, or train with that one"
        )
    if cfg.model is not None and (differs := preset_differences(cfg, model_cfg)):
        raise UserError(
            f"init_from {cfg.init_from} is not the {cfg.model} preset ({differs}): its network's shape is the run's, "
            "so drop model"
        )
    for name in MODEL_SHAPE_OPTIONS:
        if (given := getattr(cfg, name)) is not None and given != getattr(model_cfg, name):
            raise UserError(
                f"init_from {cfg.init_from} has {name} {getattr(model_cfg, name)}, not {given}: its network's shape "
                f"is the run's, so drop {name}"
            )
    return model_cfg, checkpoint


def preset_differences(cfg: TrainConfig, model_cfg: GPTConfig) -> str:
    """How `model_cfg` differs in shape from the preset `cfg.model` with `cfg`'s shape options on top ("" when they
    are the same network). The context is not compared: context_len may be shorter than the model's, and is
    checked on its own."""
    shape = {k: v for k, v in PRESETS[cfg.model].items() if k not in ("dropout", "context_len")}
    shape |= {k: getattr(cfg, k) for k in shape if getattr(cfg, k) is not None}
    return ", ".join(f"{k} {getattr(model_cfg, k)}, not {v}" for k, v in shape.items() if getattr(model_cfg, k) != v)


def steps_for_tokens(cfg: TrainConfig, model_cfg: GPTConfig, tokens_per_step: int) -> tuple[int | None, str]:
    """The run's max_steps: as given, or as many steps as it takes to train on `train_tokens`, or on
    `tokens_per_parameter` x the model's parameters (as the header counts them), rounded up; and where a budget set
    it, the line that says what it asked for."""
    if cfg.tokens_per_parameter is not None:
        with torch.device("meta"):  # shapes only: nothing allocated or initialised
            parameters = GPTModel(model_cfg).num_parameters()
        tokens = cfg.tokens_per_parameter * parameters
        asked = f"tokens_per_parameter {cfg.tokens_per_parameter:g} x {parameters:,} parameters"
    elif cfg.train_tokens is not None:
        tokens, asked = cfg.train_tokens, f"train_tokens {cfg.train_tokens:,}"
    else:
        return cfg.max_steps, ""
    steps = max(1, math.ceil(tokens / tokens_per_step))
    return steps, f"{steps * tokens_per_step:,} tokens for {asked}"


def plan_run(cfg: TrainConfig, world_size: int) -> RunPlan:
    """Check `cfg` and derive everything that does not need the data; the first problem is one UserError."""
    cfg = validate(cfg)
    if cfg.optimizer == "muon" and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise UserError(
            "optimizer muon orthogonalises whole matrices and FSDP gives each process a slice of each: use DDP "
            "(an accelerate config without FSDP) or optimizer adamw"
        )
    accumulation, global_batch = batch_geometry(cfg, world_size)
    tokenizer = get_tokenizer(cfg.tokenizer)
    model_cfg, init_checkpoint = model_config_for(cfg, tokenizer.n_vocab)
    places = [Path(d).resolve() for d in (cfg.output_dir, cfg.checkpoint_dir) if d]
    if cfg.overwrite and init_checkpoint and any(init_checkpoint.resolve().is_relative_to(d) for d in places):
        raise UserError(
            f"init_from {cfg.init_from} is in the run that overwrite moves aside before the new one starts: pass "
            "another output_dir, or move that run first and pass its new place"
        )
    context_len = cfg.context_len or model_cfg.context_len
    if context_len > model_cfg.context_len:
        where = cfg.init_from or f"the {cfg.model} preset"
        raise UserError(
            f"context_len {context_len} exceeds {context_limit(model_cfg.position)} of {where} "
            f"({model_cfg.context_len} tokens)"
        )
    max_steps, token_budget = steps_for_tokens(cfg, model_cfg, global_batch * context_len)
    if max_steps is not None:
        check_warmup(cfg.warmup_steps, max_steps, token_budget)
    eot_id = tokenizer.eot_token if cfg.special_token_id is None else cfg.special_token_id
    if eot_id >= tokenizer.n_vocab:
        raise UserError(
            f"special_token_id {eot_id} is outside the {cfg.tokenizer} vocabulary (0..{tokenizer.n_vocab - 1})"
        )
    tasks = tuple(load_tasks(cfg.eval_tasks)) if cfg.eval_tasks is not None else ()
    return RunPlan(
        cfg, world_size, accumulation, global_batch, model_cfg, context_len, cfg.stride or context_len, eot_id,
        init_checkpoint, max_steps, token_budget, tasks=tasks, tokenizer_id=tokenizer_id(cfg.tokenizer),
        tokenizer_files=carried_files(cfg.tokenizer),
    )  # fmt: skip
