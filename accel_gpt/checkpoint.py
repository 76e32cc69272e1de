"""Checkpoints as plain files: weights and optimizer tensors in safetensors, everything else in JSON; no pickle.

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory named
`checkpoint_NNNNNN` is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")
MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META = "model.safetensors", "optimizer.safetensors", "optimizer.json"
STATE_FILE, CONFIG_FILE = "trainer_state.json", "config.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories are hidden and never match)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def find_checkpoint(checkpoint_dir: str | Path, which: str) -> Path:
    """`which` is a step number or 'latest'."""
    found = list_checkpoints(checkpoint_dir)
    if not found:
        raise UserError(f"no checkpoints in {checkpoint_dir}")
    if which == "latest":
        return found[-1][1]
    by_step = dict(found)
    if int(which) not in by_step:
        steps = ", ".join(str(s) for s, _ in found)
        raise UserError(f"checkpoint {which} not found in {checkpoint_dir} (available: {steps})")
    return by_step[int(which)]


def model_state_for_saving(model: GPTModel) -> dict[str, torch.Tensor]:
    """Weights on CPU; a tied output head is stored once, as the token embedding."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("out_head.weight")
    return state


def load_model_weights(model: GPTModel, path: str | Path) -> None:
    """Load `model.safetensors` into `model` (CPU first, then wherever the model lives)."""
    state = load_file(str(path), device="cpu")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    if model.config.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into named tensors and JSON-safe scalars."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    # JSON turns tuples (e.g. AdamW's betas) into lists; "params" is the only list an optimizer expects.
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    model: GPTModel,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    run_config: dict,
) -> Path:
    """Write checkpoint `step` atomically. Call on the main process only, between two `wait_for_everyone`."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_state_for_saving(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    _write_json(tmp / OPTIMIZER_META, opt_meta)
    _write_json(tmp / STATE_FILE, trainer_state)
    _write_json(tmp / CONFIG_FILE, {"model": model.config.to_dict(), "train": run_config})
    for f in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving a step (e.g. after resuming from it): swap, never leave neither
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def load_checkpoint(path: str | Path, model: GPTModel, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights (and optimizer state) from checkpoint directory `path`; returns its trainer state."""
    path = Path(path)
    saved_model = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
    if saved_model != model.config.to_dict():
        diff = {k: (v, model.config.to_dict().get(k)) for k, v in saved_model.items() if model.config.to_dict().get(k) != v}
        raise UserError(f"checkpoint {path} was trained with a different model config (saved vs requested: {diff})")
    load_model_weights(model, path / MODEL_FILE)
    if optimizer is not None:
        tensors = load_file(str(path / OPTIMIZER_FILE), device="cpu")
        meta = json.loads((path / OPTIMIZER_META).read_text(encoding="utf-8"))
        optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
