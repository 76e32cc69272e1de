"""The optimizer: AdamW on every parameter (GPT-2's), or Muon on the hidden matrices with AdamW on the rest.

Muon (Jordan et al., 2024) follows each matrix's momentum, orthogonalised by a Newton-Schulz iteration: here in the
parameters' dtype, fp32 on CPU, batched over matrices of one shape, with the query, key and value blocks of the
fused projection as matrices of their own. Learning rates follow the schedule: AdamW's peak is `learning_rate`,
Muon's `muon_learning_rate`.
"""

from __future__ import annotations

import math
import re

import torch
from torch.optim.adamw import adamw

from accel_gpt.config import TrainConfig

# The hidden matrices, which Muon takes: attention and MLP weights. Embeddings, the head, norms and biases stay
# with AdamW (Muon is for matrices that map hidden states to hidden states).
MUON_PARAMETERS = re.compile(r"trf_blocks\.\d+\.(att\.qkv|att\.out_proj|ff\.fc|ff\.proj)\.weight$")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of modded-nanogpt and torch.optim.Muon
BETAS, EPS = (0.9, 0.95), 1e-8


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel per step, and it honours `found_inf`, which lets a non-finite step be skipped on
    the device without waiting for the host), or Muon + AdamW. Matrices are decayed, biases and norms (1-D) not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        groups = [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.initial_lr, betas=BETAS, eps=EPS, fused=True)
    muon = [(n, p) for n, p in named if MUON_PARAMETERS.search(n)]
    rest = [(n, p) for n, p in named if not MUON_PARAMETERS.search(n)]
    scale = muon_lr_scale(cfg)
    groups = [
        {"params": [p for n, p in muon if "att.qkv" in n], "kind": "muon", "blocks": 3, "lr_scale": scale},
        {"params": [p for n, p in muon if "att.qkv" not in n], "kind": "muon", "blocks": 1, "lr_scale": scale},
        {"params": [p for _, p in rest if p.dim() >= 2], "kind": "adamw", "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in rest if p.dim() < 2], "kind": "adamw", "weight_decay": 0.0},
    ]
    return MuonWithAdamW([g for g in groups if g["params"]], lr=cfg.initial_lr, weight_decay=cfg.weight_decay)


def muon_lr_scale(cfg: TrainConfig) -> float:
    """Muon's learning rate as a multiple of AdamW's at every step of the schedule (`validate` has made sure that
    AdamW's peak is not 0)."""
    return cfg.muon_learning_rate / cfg.learning_rate


def apply_learning_rates(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Give Muon's groups the config's rate: after a resume the saved groups' ratio would win, and a changed
    muon_learning_rate be ignored."""
    for group in optimizer.param_groups:
        if group.get("kind") == "muon":
            group["lr_scale"] = muon_lr_scale(cfg)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrices to `g` `[batch, rows, cols]`, approximately (singular values near 1):
    Newton-Schulz's quintic on each matrix scaled to spectral norm <= 1, on the smaller of X X^T and X^T X. In bf16
    on GPUs (fast, and precise enough there), in the input's dtype elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16) if g.is_cuda else g
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the param groups of kind "muon", torch's fused AdamW for those of kind "adamw", in one optimizer: one
    state dict (saved and resumed as AdamW's is), one `step`, and the non-finite skip through `found_inf`.

    Muon's update for a matrix of `rows x cols` is the orthogonalised Nesterov momentum scaled by
    0.2 * sqrt(max(rows, cols)), so that its RMS matches AdamW's (Moonshot's "match_rms_adamw"): learning rates
    of the two are on one scale. Decoupled weight decay as AdamW's."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.95):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "blocks": 1, "lr_scale": 1.0}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "adamw":
                self._adamw(group, params, found_inf)
            else:
                self._muon(group, params, found_inf)

    def _adamw(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
        for p in params:
            if not self.state[p]:  # as torch.optim.AdamW keeps it with fused=True
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=True, found_inf=found_inf, amsgrad=False, beta1=BETAS[0],
            beta2=BETAS[1], lr=group["lr"], weight_decay=group["weight_decay"], eps=EPS, maximize=False,
        )  # fmt: skip

    def _muon(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
        momentum, blocks = group["momentum"], group["blocks"]
        skip = None if found_inf is None else found_inf.bool()
        updates: dict[tuple[int, int], list] = {}  # matrices of one shape, orthogonalised in one batch
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            new_buf = buf.lerp(p.grad, 1 - momentum)
            nesterov = p.grad.lerp(new_buf, momentum)
            if skip is not None:  # decided on the device, as fused AdamW does: no wait for the host
                new_buf = torch.where(skip, buf, new_buf)
            buf.copy_(new_buf)
            matrices = nesterov.view(blocks, p.shape[0] // blocks, p.shape[1])
            updates.setdefault(matrices.shape[1:], []).append((p, matrices))
        for (rows, cols), items in updates.items():
            orthogonal = orthogonalize(torch.cat([m for _, m in items]))
            scale = group["lr"] * 0.2 * math.sqrt(max(rows, cols))
            for (p, _), update in zip(items, orthogonal.split(blocks)):
                new = p * (1 - group["lr"] * group["weight_decay"]) - scale * update.reshape(p.shape)
                p.copy_(new if skip is None else torch.where(skip, p, new))
