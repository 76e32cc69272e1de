"""GPT-2 from scratch: token + position embeddings, pre-LayerNorm blocks with causal attention and a GELU MLP.

Numerically the same network as Hugging Face's `GPT2LMHeadModel` (tests/test_model.py proves it), plus decoding
with a key/value cache and greedy, top-k and nucleus (top-p) sampling. Off by default, the options of today's
small-GPT recipes (nanochat, modded-nanogpt): rotary positions, RMSNorm, QK-norm, ReLU², zero-initialised
output projections and logit soft-capping.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class GPTConfig:
    vocabulary_size: int = 50257
    context_len: int = 1024
    embedding_dim: int = 768
    num_heads: int = 12
    num_layers: int = 12
    dropout: float = 0.1
    qkv_bias: bool = False
    # Biases in the LayerNorms and in every linear layer but qkv (qkv_bias) and the head (never). GPT-2 has them;
    # nanoGPT drops them by default ("a bit better and faster", its comment says), so its speeds are without them.
    bias: bool = True
    tie_weights: bool = False
    # Embedding and head rows are rounded up to a multiple of this: matmuls over a 50,304-wide head run faster
    # than over 50,257 on GPUs. The extra rows stay zero and their logits are masked, so they change no result.
    vocab_multiple: int = 1
    # The modern options; the defaults are GPT-2's (what `export` writes).
    position: str = "learned"  # "learned": GPT-2's position table; "rotary": RoPE on queries and keys
    norm: str = "layernorm"  # or "rmsnorm"
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    activation: str = "gelu"  # or "relu2": ReLU squared
    zero_init_projections: bool = False  # the attention and MLP output projections start at zero
    logit_softcap: float = 0.0  # > 0: logits = logit_softcap * tanh(logits / logit_softcap)

    def __post_init__(self):
        if self.embedding_dim % self.num_heads:
            raise ValueError(f"embedding_dim ({self.embedding_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple must be >= 1, got {self.vocab_multiple}")
        for name, allowed in OPTION_VALUES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.position == "rotary" and (self.embedding_dim // self.num_heads) % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.embedding_dim // self.num_heads}")
        if not 0.0 <= self.logit_softcap < math.inf:
            raise ValueError(f"logit_softcap must be a finite number >= 0, got {self.logit_softcap}")

    @property
    def padded_vocabulary_size(self) -> int:
        return -(-self.vocabulary_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)


OPTION_VALUES = {"position": ("learned", "rotary"), "norm": ("layernorm", "rmsnorm"), "activation": ("gelu", "relu2")}
# What GPT-2 (and Hugging Face's GPT2LMHeadModel) is: a config with any other of these values is another network.
GPT2_OPTIONS = {
    "position": "learned",
    "norm": "layernorm",
    "qk_norm": False,
    "activation": "gelu",
    "logit_softcap": 0.0,
}


def gpt2_differences(cfg: GPTConfig) -> list[str]:
    """The options in which `cfg` is not GPT-2's network, as `name value`."""
    return [f"{name} {getattr(cfg, name)}" for name, value in GPT2_OPTIONS.items() if getattr(cfg, name) != value]


def context_limit(position: str) -> str:
    """What bounds a model's context, for messages: its learned position table, or the context a rotary model was
    trained at (extending it is not supported)."""
    return "the position table" if position == "learned" else "the context (rotary positions)"


# GPT-2's published sizes, plus two CPU-sized presets for tests and the default run.
PRESETS: dict[str, dict] = {
    "tiny": dict(embedding_dim=64, num_layers=2, num_heads=2, context_len=64, dropout=0.0),
    "mini": dict(embedding_dim=128, num_layers=2, num_heads=4, context_len=128, dropout=0.0),
    "gpt2-small": dict(embedding_dim=768, num_layers=12, num_heads=12, context_len=1024),
    "gpt2-medium": dict(embedding_dim=1024, num_layers=24, num_heads=16, context_len=1024),
    "gpt2-large": dict(embedding_dim=1280, num_layers=36, num_heads=20, context_len=1024),
    "gpt2-xl": dict(embedding_dim=1600, num_layers=48, num_heads=25, context_len=1024),
}


ATTENTION_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_backends(choice: str) -> contextlib.AbstractContextManager:
    """A context in which attention prefers the `choice` kernel (falling back to the others where it cannot run).

    "auto" keeps torch's own order (FlashAttention first on GPUs): on an H200, cuDNN's kernel is faster alone but
    gave no gain inside gpt2-small's compiled step (benchmarks/RESULTS.md), so there is nothing to gain by
    overriding it."""
    if choice == "auto":
        return contextlib.nullcontext()
    first = ATTENTION_BACKENDS[choice]
    return sdpa_kernel([first] + [b for b in ATTENTION_BACKENDS.values() if b != first], set_priority=True)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.embedding_dim, eps=1e-5)
    return nn.LayerNorm(cfg.embedding_dim, eps=1e-5, bias=cfg.bias)


def rotary_tables(head_dim: int, positions: torch.Tensor, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[positions, head_dim / 2]` of RoPE's angles: frequency i turns by base^(-2i / head_dim) a step."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Queries or keys `[batch, heads, seq, head_dim]` turned by their positions' angles (the halves of each head
    as the pairs, as Hugging Face's LLaMA does)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        # One fused projection: a single matmul for q, k and v is faster than three.
        self.qkv = nn.Linear(cfg.embedding_dim, 3 * cfg.embedding_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.embedding_dim, cfg.embedding_dim, bias=cfg.bias)

    def forward(
        self, x: torch.Tensor, rope=None, cache: LayerCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`rope`: the cos and sin tables of x's positions, for rotary positions; None for a position table.
        `mask`: which positions each may attend to, `[batch, 1, seq, seq]` (None: every earlier one)."""
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.shape[-1],), eps=1e-5), F.rms_norm(k, (k.shape[-1],), eps=1e-5)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is not None:  # decoding: attend to every cached position as well
            k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0
        if mask is not None:  # document_mask: a boolean mask, which SDPA's flash kernel does not take
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            # is_causal lets SDPA pick flash/memory-efficient kernels and avoids materialising a mask. A single new
            # token may see every cached position, so it needs no mask (LayerCache.append rules out the other cases).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, dim))


def document_mask(idx: torch.Tensor, boundary: int) -> torch.Tensor:
    """Block-causal attention `[batch, 1, seq, seq]`: position i sees position j <= i of its own document alone, a
    document starting at each `boundary` token (the end-of-text, first in a document as GPT-2 saw them)."""
    document = torch.cumsum(idx == boundary, dim=1)
    seq = idx.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=idx.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.embedding_dim, 4 * cfg.embedding_dim, bias=cfg.bias)
        # GPT-2's "gelu_new", or ReLU squared (modded-nanogpt, nanochat)
        self.activation = nn.GELU(approximate="tanh") if cfg.activation == "gelu" else ReLUSquared()
        self.proj = nn.Linear(4 * cfg.embedding_dim, cfg.embedding_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope=None, cache: LayerCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), rope, cache, mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


# Parameters with one row per vocabulary entry: what vocabulary padding resizes.
VOCABULARY_PARAMETERS = ("tok_emb.weight", "out_head.weight")


def fit_vocabulary_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its first dimension cut or zero-padded to `rows`: moves embedding/head weights (and their
    optimizer moments) between padded and unpadded layouts. Padding rows are zero and stay zero in training."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


class LayerCache:
    """One layer's keys and values `[batch, heads, positions, head_dim]` for the positions decoded so far,
    preallocated to `capacity` positions so each new token is written in place instead of re-concatenated."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys = self.values = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return those of every position so far."""
        new = k.shape[2]
        if self.length and new > 1:  # SDPA's causal mask is top-left aligned: wrong for a block after a prefix
            raise ValueError("after the prefill a cache grows one position at a time")
        if self.length + new > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; clear it before the window slides")
        if self.keys is None or self.keys.shape[0] != k.shape[0]:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        end = self.length + new
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Every layer's keys and values, so decoding runs one new position per token instead of the whole text."""

    def __init__(self, num_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions cached: the position index of the next token."""
        return self.layers[0].length

    def clear(self) -> None:
        for layer in self.layers:
            layer.length = 0


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, computed `chunk` tokens at a time.

    The full `[tokens, vocab]` logits and their gradient are never held at once: each chunk's logits are made,
    turned into that chunk's loss and its gradients for `hidden` and `weight`, and dropped. With GPT-2's
    50,257-wide head this is most of a small model's step; the gradients are computed in the forward pass, so
    backward only scales them. Logits from row `vocabulary_size` on (a padded head) are masked out; with `softcap`
    > 0 the logits are soft-capped first (softcap * tanh(logits / softcap))."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, need_grad: bool, vocabulary_size: int, softcap: float):
        tokens = hidden.shape[0]
        autocast = torch.is_autocast_enabled(hidden.device.type)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, tokens, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            if softcap:  # in place where it can: the chunk's logits are most of a small model's step
                capped = logits.div_(softcap).tanh_()
                logits = capped * softcap
            logits[:, vocabulary_size:] = float("-inf")
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: one pass over the chunk's logits, reused for the gradient
            row_sum = probs.sum(dim=-1)
            loss += (row_max.squeeze(1) + row_sum.log() - target_logits).sum()
            if need_grad:  # d(summed loss)/d(logits) = softmax - onehot; the mean's 1/tokens waits for backward
                probs.div_(row_sum[:, None])
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if softcap:  # through the cap: d(softcap * tanh(z / softcap)) / dz = 1 - tanh(z / softcap)^2
                    probs.mul_(capped.square_().neg_().add_(1.0))
                grad_logits = probs.to(weight.dtype)
                grad_hidden[start : start + chunk] = grad_logits @ weight
                # An in-place addmm into the fp32 sum would bypass autocast (and run in fp32), and fails on bf16
                # parameters without autocast (FSDP's mixed precision): multiply in their dtype, then add.
                if autocast or h.dtype != grad_weight.dtype:
                    grad_weight += grad_logits.T @ h
                else:
                    grad_weight.addmm_(grad_logits.T, h)
        if need_grad:
            ctx.tokens, ctx.weight_dtype = tokens, weight.dtype
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / tokens

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled by the upstream gradient (fp16's loss scale) and 1/tokens only here: fp16 gradients of the mean,
        # formed in the forward pass, underflowed (a small probability over thousands of tokens is below 6e-8).
        scale = grad_loss / ctx.tokens
        return grad_hidden * scale, (grad_weight * scale).to(ctx.weight_dtype), None, None, None, None, None


# The fused loss's gain on CPU is its single exp pass with the gradient formed in the same pass, not small chunks:
# larger chunks measured faster at every size tried (benchmarks/RESULTS.md: mini 1.5-1.6x the plain loss against
# 1.2-1.3x with 64-token chunks; gpt2-small 1.03-1.15x against 0.82x). 4,096 tokens bound the chunk's fp32 logits
# to 0.8 GB with GPT-2's vocabulary.
CPU_LOSS_CHUNK = 4096


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = CPU_LOSS_CHUNK,
    vocabulary_size: int | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (hidden `[..., dim]`, targets `[...]`), over the first
    `vocabulary_size` logits (default: all), soft-capped at `softcap` if > 0."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    vocabulary_size = weight.shape[0] if vocabulary_size is None else vocabulary_size
    return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, need_grad, vocabulary_size, softcap)


class GPTModel(nn.Module):
    """GPT-2. Build from a `GPTConfig`, or from the original keyword names (`GPTModel(embedding_dim=..., ...)`)."""

    def __init__(self, cfg: GPTConfig | dict | None = None, **kwargs):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = GPTConfig(**cfg)
        if cfg is None:
            cfg = GPTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a GPTConfig or keyword arguments, not both")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocabulary_size, cfg.embedding_dim)
        self.pos_emb = nn.Embedding(cfg.context_len, cfg.embedding_dim) if cfg.position == "learned" else None
        self.drop_emb = nn.Dropout(cfg.dropout)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg.embedding_dim, cfg.vocabulary_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * layers) so the residual stream's variance stays bounded;
        # zero_init_projections starts them at zero: each block begins as the identity (modded-nanogpt).
        for name, param in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))
                if cfg.zero_init_projections:
                    nn.init.zeros_(param)
        if cfg.padded_vocabulary_size != cfg.vocabulary_size:
            # Padded after initialisation, with zeros: the random draws, hence the real rows, match an unpadded model.
            for module in (self.tok_emb, self.out_head):
                module.weight = nn.Parameter(fit_vocabulary_rows(module.weight.data, cfg.padded_vocabulary_size))
            self.tok_emb.num_embeddings = self.out_head.out_features = cfg.padded_vocabulary_size
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        # Training choices, not part of the saved architecture:
        self.activation_checkpointing = False
        # Tokens per chunk of the fused loss; 0 = plain cross-entropy on full logits. None picks what measured
        # fastest (benchmarks/loss_chunk.py): CPU_LOSS_CHUNK on CPU, plain on GPUs (chunking cost 3-10% on an
        # H100, and saves the memory of the full logits).
        self.loss_chunk: int | None = None
        # The end-of-text id where attention stops (document_mask): a window's tokens attend only to those of their
        # own document, which that token starts. None: causal attention across the whole window.
        self.document_boundary: int | None = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Token ids `[batch, seq]` -> logits `[batch, seq, vocabulary_size]` (never the padding rows); with
        `targets`, the mean cross-entropy instead (on CPU computed in chunks so the full logits never exist: the
        fast path there).

        With a `cache` (decoding), `idx` continues the cached positions, its keys and values are added to the
        cache, and only the last position's logits `[batch, 1, vocabulary_size]` are returned."""
        x = self.hidden_states(idx, cache)
        vocabulary, softcap = self.config.vocabulary_size, self.config.logit_softcap
        if targets is None:
            return self.soft_cap(self.out_head(x)[..., :vocabulary])
        chunk = self.loss_chunk if self.loss_chunk is not None else (CPU_LOSS_CHUNK if x.device.type == "cpu" else 0)
        if chunk == 0:
            logits = self.soft_cap(self.out_head(x))
            if logits.shape[-1] > vocabulary:  # padding rows: never a prediction, and their gradient is zero
                logits[..., vocabulary:] = float("-inf")
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return chunked_cross_entropy(x, self.out_head.weight, targets, chunk, vocabulary, softcap)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final norm's output `[batch, seq, dim]`, what the output head reads (with a `cache`, the last
        position's only): `forward` without the head, for scoring a few positions with `token_loss_sum`."""
        seq = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + seq > self.config.context_len:
            raise ValueError(f"sequence length {start + seq} exceeds the model's context_len {self.config.context_len}")
        positions = torch.arange(start, start + seq, device=idx.device)
        x, rope = self.tok_emb(idx), None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rotary_tables(self.config.embedding_dim // self.config.num_heads, positions)
        x = self.drop_emb(x)
        mask = (
            document_mask(idx, self.document_boundary) if self.document_boundary is not None and cache is None else None
        )
        for i, block in enumerate(self.trf_blocks):
            if cache is not None:
                x = block(x, rope, cache.layers[i])
            elif self.activation_checkpointing and self.training:  # recompute activations in backward: less memory
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, None, mask)
        if cache is not None:  # decoding needs the next token's logits only: skip the head for the prompt
            x = x[:, -1:]
        return self.final_norm(x)

    def token_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of `targets` `[tokens]` after `hidden` `[tokens, dim]`, in fp32, by the chunked
        loss on every device: scoring never holds a batch's full logits (evaluation's memory and time)."""
        vocabulary, softcap = self.config.vocabulary_size, self.config.logit_softcap
        mean = chunked_cross_entropy(hidden, self.out_head.weight, targets, CPU_LOSS_CHUNK, vocabulary, softcap)
        return mean * len(targets)

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Distinct parameters (a tied output head counts once), not counting vocabulary padding rows."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        cfg = self.config
        total -= (cfg.padded_vocabulary_size - cfg.vocabulary_size) * cfg.embedding_dim * (1 if cfg.tie_weights else 2)
        if exclude_position_embeddings and self.pos_emb is not None:
            total -= self.pos_emb.weight.numel()
        return total


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids `[batch, 1]` from the last position's logits `[batch, vocab]`: argmax when temperature is 0
    or top_k is 1; else a draw from softmax(logits / temperature), cut to the top_k tokens and then to the
    smallest set whose probability reaches top_p (nucleus sampling), in the order Hugging Face applies them."""
    if temperature <= 0.0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def stream_tokens(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each token id `[batch, 1]` that follows `idx` `[batch, seq]` as soon as it is chosen, up to
    `max_new_tokens` or until every row picks `eos_id`; sampling as in `sample_next` (greedy by default).

    The prompt is run once and each new token then costs one position, its keys and values cached per layer
    (`use_cache=False` re-runs the whole window for every token: the same tokens, much slower). Once the text
    is longer than `context_size`, each token re-runs the last `context_size` tokens, as without a cache."""
    context_size = context_size or model.config.context_len
    cache = KVCache(model.config.num_layers, context_size) if use_cache else None
    pending = idx  # tokens whose keys and values are not cached yet
    for _ in range(max_new_tokens):
        if cache is None or cache.length + pending.shape[1] > context_size:
            # No cache, or the text outgrew the window: positions are absolute (a table, or rotary angles of
            # cached keys), so once the window slides every cached key and value is stale. Recompute from the last
            # context_size tokens.
            if cache is not None:
                cache.clear()
            logits = model(idx[:, -context_size:], cache=cache)
        else:
            logits = model(pending, cache=cache)
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if eos_id is not None and bool((next_id == eos_id).all()):
            return
        yield next_id
        idx = torch.cat([idx, next_id], dim=1)
        pending = next_id


def generate_ids(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, *args, **kwargs) -> torch.Tensor:
    """`idx` `[batch, seq]` extended by up to `max_new_tokens` tokens; the options are `stream_tokens`'
    (context_size, temperature, top_k, eos_id, generator, top_p, use_cache): greedy by default."""
    return torch.cat([idx, *stream_tokens(model, idx, max_new_tokens, *args, **kwargs)], dim=1)


def __getattr__(name: str):  # names of earlier releases (accel_gpt/compat.py)
    from accel_gpt.compat import old_name

    return old_name(__name__, name)
