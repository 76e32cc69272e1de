"""Hugging Face interop: the same weights under `transformers.GPT2LMHeadModel`'s names and config, both ways.

Export (`python -m accel_gpt.export`) and `init_from` use it, as do the parity test and the model-step benchmark.
GPT-2 has no switch for unbiased layers, so a model without qkv bias (or without `bias`) maps to zero biases. Reading
and writing need only safetensors and JSON; `transformers` is needed only to build a live HF model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from accel_gpt.checkpoint import load_safetensors
from accel_gpt.errors import UserError
from accel_gpt.model import GPTConfig, GPTModel, fit_vocabulary_rows, gpt2_differences
from accel_gpt.tokenizer import HF_TOKENIZER_FILES, get_tokenizer, write_hf_tokenizer

# Our block's parameter names -> GPT-2's (HF stores the Linear weights transposed, as Conv1D).
BLOCK_NAMES = {
    "norm1": "ln_1",
    "norm2": "ln_2",
    "att.qkv": "attn.c_attn",
    "att.out_proj": "attn.c_proj",
    "ff.fc": "mlp.c_fc",
    "ff.proj": "mlp.c_proj",
}


def hf_config_kwargs(cfg: GPTConfig) -> dict:
    """Keyword arguments for `transformers.GPT2Config` describing the same network (dropout included)."""
    return dict(
        vocab_size=cfg.vocabulary_size,
        n_positions=cfg.context_len,
        n_embd=cfg.embedding_dim,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_weights,
    )


def zeros_like_rows(weight: torch.Tensor) -> torch.Tensor:
    """The zero bias of a layer without one: one per output row (our Linear and LayerNorm layouts alike)."""
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our parameter names -> GPT2LMHeadModel's (without vocabulary padding rows); a network GPT-2 cannot hold is
    one UserError naming the options."""
    if differences := gpt2_differences(model.config):
        raise UserError(
            f"GPT-2 has no {', '.join(differences)}: this model cannot be exported as GPT2LMHeadModel (train with "
            "the GPT-2 defaults of these options to export)"
        )
    sd, cfg = model.state_dict(), model.config
    rows = cfg.vocabulary_size
    out = {"transformer.wte.weight": sd["tok_emb.weight"][:rows], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.num_layers):
        for ours, theirs in BLOCK_NAMES.items():
            weight = sd[f"trf_blocks.{i}.{ours}.weight"]
            bias = sd.get(f"trf_blocks.{i}.{ours}.bias")
            hf = f"transformer.h.{i}.{theirs}"
            out[hf + ".weight"] = weight if theirs.startswith("ln") else weight.T.contiguous()
            out[hf + ".bias"] = bias if bias is not None else zeros_like_rows(weight)
    out["transformer.ln_f.weight"] = sd["final_norm.weight"]
    out["transformer.ln_f.bias"] = sd.get("final_norm.bias", zeros_like_rows(sd["final_norm.weight"]))
    out["lm_head.weight"] = sd["out_head.weight"][:rows]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's parameter names -> ours (the inverse of `to_hf_state_dict`), padded as `cfg` asks."""
    hf = {k.removeprefix("transformer.") if not k.startswith("lm_head") else k: v for k, v in hf.items()}
    rows = cfg.padded_vocabulary_size
    hf["wte.weight"] = fit_vocabulary_rows(hf["wte.weight"], rows)
    if "lm_head.weight" in hf:
        hf["lm_head.weight"] = fit_vocabulary_rows(hf["lm_head.weight"], rows)
    out = {
        "tok_emb.weight": hf["wte.weight"],
        "pos_emb.weight": hf["wpe.weight"],
        "final_norm.weight": hf["ln_f.weight"],
        "final_norm.bias": hf["ln_f.bias"],
    }
    for i in range(cfg.num_layers):
        for ours, theirs in BLOCK_NAMES.items():
            weight = hf[f"h.{i}.{theirs}.weight"]
            out[f"trf_blocks.{i}.{ours}.weight"] = weight if theirs.startswith("ln") else weight.T.contiguous()
            out[f"trf_blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    out["out_head.weight"] = hf.get("lm_head.weight", hf["wte.weight"]) if not cfg.tie_weights else hf["wte.weight"]
    return out


EXPORT_FILES = ("config.json", "model.safetensors", *HF_TOKENIZER_FILES)  # what export_to_hf writes


def export_to_hf(model: GPTModel, out_dir: str | Path, tokenizer: str = "gpt2") -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained(out_dir)` loads, and the
    tokenizer's files that `AutoTokenizer.from_pretrained(out_dir)` loads (GPT-2's, or a tokenizer folder's;
    tiktoken's other encodings have none)."""
    state = to_hf_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.config.tie_weights:  # stored once; transformers re-ties lm_head to wte on load
        state.pop("lm_head.weight")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_inner": None,
        "bos_token_id": get_tokenizer(tokenizer).eot_token,
        "eos_token_id": get_tokenizer(tokenizer).eot_token,
        **hf_config_kwargs(model.config),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_hf_tokenizer(tokenizer, out, model.config.context_len)
    return out


def read_hf_gpt2_config(folder: str | Path, dropout: float | None = None, vocab_multiple: int = 1) -> GPTConfig:
    """The GPTConfig of a local Hugging Face GPT-2 folder, refusing what is not GPT-2."""
    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"init_from {folder}: no readable config.json ({err})") from None
    if hf_config.get("model_type") != "gpt2":
        raise UserError(f"init_from {folder}: model_type {hf_config.get('model_type')!r}, expected 'gpt2'")
    mlp = hf_config.get("n_inner")
    if hf_config.get("activation_function", "gelu_new") != "gelu_new" or mlp not in (None, 4 * hf_config["n_embd"]):
        raise UserError(f"init_from {folder}: only GPT-2's gelu_new MLP of 4 x n_embd is supported")
    return GPTConfig(
        vocabulary_size=hf_config["vocab_size"],
        context_len=hf_config["n_positions"],
        embedding_dim=hf_config["n_embd"],
        num_heads=hf_config["n_head"],
        num_layers=hf_config["n_layer"],
        dropout=hf_config.get("resid_pdrop", 0.1) if dropout is None else dropout,
        qkv_bias=True,
        tie_weights=hf_config.get("tie_word_embeddings", True),
        vocab_multiple=vocab_multiple,
    )


def load_hf_gpt2(folder: str | Path, cfg: GPTConfig) -> GPTModel:
    """A GPTModel (of `read_hf_gpt2_config`'s config) holding the folder's `model.safetensors` weights."""
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"init_from {folder}: needs model.safetensors (save with safe_serialization=True)")
    model = GPTModel(cfg)
    model.load_state_dict(from_hf_state_dict(load_safetensors(weights), cfg))
    return model


def to_hf_model(model: GPTModel):
    """A live `transformers.GPT2LMHeadModel` (sdpa attention) holding a copy of `model`'s weights."""
    import transformers

    config = transformers.GPT2Config(**hf_config_kwargs(model.config), attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or any("attn.bias" not in k and "masked_bias" not in k for k in missing):
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf
