"""Hugging Face interop: the same weights under `transformers.GPT2LMHeadModel`'s names and config.

Used by the parity test and the model-step benchmark; GPT-2 has no switch for an unbiased qkv projection, so a
model without qkv bias maps to zero biases.
"""

from __future__ import annotations

import torch

from accel_gpt.model import GPTConfig, GPTModel


def hf_config_kwargs(cfg: GPTConfig) -> dict:
    """Keyword arguments for `transformers.GPT2Config` describing the same network (dropout included)."""
    return dict(
        vocab_size=cfg.vocabulary_size, n_positions=cfg.context_len, n_embd=cfg.embedding_dim,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_weights,
    )


def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our parameter names -> GPT2LMHeadModel's (HF's Conv1D stores weights transposed)."""
    sd, cfg, out = model.state_dict(), model.config, {}
    out["transformer.wte.weight"] = sd["tok_emb.weight"]
    out["transformer.wpe.weight"] = sd["pos_emb.weight"]
    for i in range(cfg.num_layers):
        p, h = f"trf_blocks.{i}.", f"transformer.h.{i}."
        pairs = {
            "ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "att.qkv", "attn.c_proj": "att.out_proj",
            "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj",
        }
        for hf_name, ours in pairs.items():
            weight = sd[p + ours + ".weight"]
            out[h + hf_name + ".weight"] = weight if hf_name.startswith("ln") else weight.T.contiguous()
            bias = sd.get(p + ours + ".bias")
            out[h + hf_name + ".bias"] = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["final_norm.weight"], sd["final_norm.bias"]
    out["lm_head.weight"] = sd["out_head.weight"]
    return out


def to_hf_model(model: GPTModel):
    """A `transformers.GPT2LMHeadModel` (sdpa attention) holding a copy of `model`'s weights."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(model.config), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or any("attn.bias" not in k and "masked_bias" not in k for k in missing):
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf
