"""What a training process will need in memory, estimated from the plan before anything is allocated, against what
its device has free: said in the header, and a run that cannot fit stops in one line instead of at the OOM killer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from accel_gpt.errors import UserError
from accel_gpt.model import CPU_LOSS_CHUNK, GPTConfig
from accel_gpt.plan import RunPlan

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # bytes per process, each part
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def parts(self) -> str:
        named = {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                 "activations": self.activations}  # fmt: skip
        return ", ".join(f"{name} {size / GIB:.1f}" for name, size in named.items())


def estimate(
    cfg: GPTConfig, batch_size: int, context_len: int, optimizer: str, mixed_precision: str, shards: int,
    checkpointing: bool, loss_chunk: int,
) -> MemoryEstimate:  # fmt: skip
    """Bytes a process holds at the peak of a step: fp32 weights and gradients (each 1/`shards` of them under
    FSDP), the optimizer's state (AdamW: two moments; Muon: one for the hidden matrices), and the activations kept
    for backward of one micro-batch: about 34 x dim values per token and layer (Korthikanti et al., 2022, with
    attention kernels that never hold the seq x seq scores), only each block's input with activation
    checkpointing, plus the loss's logits and their gradient."""
    dim, layers, vocab = cfg.embedding_dim, cfg.num_layers, cfg.padded_vocabulary_size
    blocks = layers * 12 * dim * dim  # attention (4 d^2) and MLP (8 d^2) weights
    embeddings = vocab * dim * (1 if cfg.tie_weights else 2) + (context_len * dim if cfg.position == "learned" else 0)
    params = blocks + embeddings
    per_param = 8 if optimizer == "adamw" else 8 * (params - blocks) / params + 4 * blocks / params
    value = 2 if mixed_precision in ("bf16", "fp16") else 4
    tokens = batch_size * context_len
    kept = tokens * dim * layers * (1 if checkpointing else 34) * value / 2  # the formula counts 16-bit halves
    logits = min(tokens, loss_chunk or tokens) * vocab * 4 * 3  # fp32 logits, probabilities, their gradient
    return MemoryEstimate(4 * params / shards, 4 * params / shards, per_param * params / shards, kept + logits)


def available(device: torch.device, local_processes: int) -> float | None:
    """Bytes free for one process: on a GPU what CUDA reports free on it, on CPU this machine's available memory
    shared by its processes; None where it cannot tell."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024 / max(1, local_processes)
    except (OSError, KeyError, ValueError):
        return None


def check_fits(plan: RunPlan, device: torch.device, mixed_precision: str, shards: int) -> str:
    """The header's note on memory; a run whose estimate exceeds what its device has free stops here, before the
    model exists, unless memory_check is false."""
    cfg = plan.cfg
    chunk = cfg.loss_chunk if cfg.loss_chunk is not None else (CPU_LOSS_CHUNK if device.type == "cpu" else 0)
    need = estimate(
        plan.model_config, cfg.batch_size, plan.context_len, cfg.optimizer, mixed_precision, shards,
        cfg.activation_checkpointing, chunk,
    )  # fmt: skip
    free = available(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if free is None:
        return f"memory ~{need.total / GIB:.1f} GiB"
    if need.total > free and cfg.memory_check:
        where = f"on {device}" if device.type == "cuda" else "for each process on this machine"
        ways = ["lower batch_size", *(["turn on activation_checkpointing"] * (not cfg.activation_checkpointing)),
                *(["shard with FSDP"] * (shards == 1)), "or pass --memory_check false to try anyway"]  # fmt: skip
        raise UserError(
            f"model {plan.model_name} needs about {need.total / GIB:.1f} GiB a process ({need.parts()} GiB, "
            f"micro-batches of {cfg.batch_size} x {plan.context_len}), more than the {free / GIB:.1f} GiB free "
            f"{where}: {', '.join(ways)}"
        )
    return f"memory ~{need.total / GIB:.1f} of {free / GIB:.1f} GiB free"
