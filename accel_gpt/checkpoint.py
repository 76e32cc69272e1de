"""Checkpoints as plain files: tensors in safetensors, everything else in JSON; nothing is pickled or executed.

A checkpoint is written into a hidden temporary directory, verified, and renamed into place; `manifest.json`
records every file's size and sha256, so a torn or corrupted checkpoint is detected and skipped on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file, save_file

from accel_gpt.errors import UserError
from accel_gpt.model import VOCABULARY_PARAMETERS, GPTConfig, GPTModel, context_limit, fit_vocabulary_rows

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")
MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META = "model.safetensors", "optimizer.safetensors", "optimizer.json"
STATE_FILE, CONFIG_FILE, RNG_FILE, RNG_META = "trainer_state.json", "config.json", "rng.safetensors", "rng.json"
STREAM_FILE, STREAM_META = "stream.safetensors", "stream.json"  # streaming runs: where each rank's stream is
MANIFEST = "manifest.json"
# Bytes per element of each safetensors dtype: used to check a header before anything is allocated.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Checkpoint directories, oldest first (temporary directories are hidden and never match)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Raise UserError unless every file the manifest lists is present with its recorded size and hash."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"checkpoint {path} is incomplete or corrupt: missing or unreadable {MANIFEST}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and {"bytes", "sha256"} <= e.keys() for e in files.values()
    ):
        raise UserError(f"checkpoint {path} is corrupt: {MANIFEST} does not list its files with sizes and hashes")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise UserError(
                f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, expected {expected['bytes']}"
            )
        if _sha256(file) != expected["sha256"]:
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its recorded sha256")


def restore_swapped_out(checkpoint_dir: str | Path) -> None:
    """Re-saving a step moves the old copy aside, then renames the new one in: a writer killed between the two
    renames leaves only the hidden old copy. Put it back. Call from the one process that writes checkpoints."""
    for old in Path(checkpoint_dir).glob(".checkpoint_*.old-*"):
        final = old.with_name(old.name[1:].split(".old-")[0])
        if CHECKPOINT_RE.match(final.name) and not final.exists():
            os.replace(old, final)


def find_checkpoint(checkpoint_dir: str | Path, which: str) -> Path:
    """`which` is a step number or 'latest' (the newest checkpoint that verifies; broken ones are skipped).
    Call from the main process: it may restore a checkpoint left hidden by an interrupted re-save."""
    restore_swapped_out(checkpoint_dir)
    found = list_checkpoints(checkpoint_dir)
    if not found:
        raise UserError(f"no checkpoints in {checkpoint_dir}")
    if which != "latest":
        by_step = dict(found)
        if int(which) not in by_step:
            steps = ", ".join(str(s) for s, _ in found)
            raise UserError(f"checkpoint {which} not found in {checkpoint_dir} (available: {steps})")
        verify_checkpoint(by_step[int(which)])
        return by_step[int(which)]
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
            return path
        except UserError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    raise UserError(f"no complete checkpoint in {checkpoint_dir}: every one failed verification")


def read_safetensors_header(path: Path) -> dict:
    """Parse and bounds-check a safetensors header, so a truncated or foreign file (a pickle, say) is refused
    before any tensor memory is allocated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise UserError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise UserError(f"{path} is not a safetensors file (header is not a JSON object)")
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            expected = DTYPE_BYTES[entry["dtype"]] * int(np.prod(entry["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} has a malformed safetensors entry {name!r}") from None
        if not 0 <= begin <= end <= data_bytes or end - begin != expected:
            raise UserError(f"{path} is truncated or corrupt: tensor {name!r} lies outside the file")
    return header


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors on CPU after validating the header."""
    path = Path(path)
    read_safetensors_header(path)
    return load_file(str(path), device="cpu")


def full_state_dicts(model: GPTModel, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU, both keyed by parameter name.

    The same call serves one process, DDP and FSDP (torch's distributed state-dict API gathers shards). It is a
    collective under FSDP, so call it on every rank: the main process receives the full state, the others may
    receive empty dicts. On one process the tensors may alias the live parameters: write them out before the
    next step."""
    # Imported here: torch's distributed state-dict helpers take about a second to import, which the inference
    # commands (they only read model weights) should not pay.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def model_state_for_saving(model_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tied output head is stored once, as the token embedding."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    if config.tie_weights:
        state.pop("out_head.weight", None)
    return state


def _strip_wrappers(name: str) -> str:
    return name.removeprefix("module.").removeprefix("_orig_mod.")


def _check_names(path: Path, found: set[str], expected: set[str]) -> None:
    if found != expected:
        missing, unexpected = sorted(expected - found)[:3], sorted(found - expected)[:3]
        raise UserError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")


def check_model_file(path: Path, model: GPTModel) -> None:
    """Refuse a weights file whose tensor names differ from the model's, reading only its header."""
    found = {_strip_wrappers(k) for k in read_safetensors_header(path) if k != "__metadata__"}
    expected = set(model.state_dict()) - ({"out_head.weight"} if model.config.tie_weights else set())
    _check_names(path, found, expected)


def fit_vocabulary_padding(tensors: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Cut or zero-pad the rows of the vocabulary parameters (and of their optimizer moments, named
    `<parameter>.exp_avg`) to `config`'s padding: a checkpoint saved with another `vocab_multiple`, or before
    padding existed, loads exactly, since padding rows and their moments are zero."""
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and any(name == p or name.startswith(p + ".") for p in VOCABULARY_PARAMETERS):
            tensors[name] = fit_vocabulary_rows(tensor, config.padded_vocabulary_size)
    return tensors


def read_model_state(path: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """`model.safetensors` as a state dict for a model of `config` (a tied head restored from the embedding)."""
    state = fit_vocabulary_padding({_strip_wrappers(k): v for k, v in load_safetensors(path).items()}, config)
    if config.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    return state


def load_model_weights(model: GPTModel, path: str | Path) -> None:
    """Load `model.safetensors` into an unsharded `model` (CPU first, then wherever the model lives)."""
    check_model_file(Path(path), model)
    model.load_state_dict(read_model_state(Path(path), model.config))


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict keyed by parameter name into named tensors and JSON-safe scalars."""
    tensors, scalars = {}, {}
    for param_name, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_name}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param_name}.{key}"] = value
    # A learning rate held in a device tensor (a CUDA-graph step reads it there) is stored as a number.
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_name, key = name.rsplit(".", 1)  # parameter names contain dots, state keys ("exp_avg") do not
        state.setdefault(param_name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_to_files(rng_states: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {}
    for rank, state in enumerate(rng_states):
        for key in ("torch", "cuda"):
            if key in state:
                tensors[f"rank{rank}.{key}"] = state[key].cpu().contiguous()
        kind, keys, pos, has_gauss, cached = state["numpy"]
        meta[f"rank{rank}"] = {"python": state["python"], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, meta


def load_rng_states(path: Path) -> list[dict]:
    """Per-rank RNG states saved in checkpoint `path`, in rank order."""
    tensors = load_safetensors(path / RNG_FILE)
    meta = json.loads((path / RNG_META).read_text(encoding="utf-8"))
    states = []
    for rank in range(len(meta)):
        state = dict(meta[f"rank{rank}"])
        state |= {key: tensors[f"rank{rank}.{key}"] for key in ("torch", "cuda") if f"rank{rank}.{key}" in tensors}
        states.append(state)
    return states


def _streams_to_files(stream_states: list[dict]) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {
        f"rank{rank}.{name}": np.ascontiguousarray(array)
        for rank, state in enumerate(stream_states)
        for name, array in state["arrays"].items()
    }
    return arrays, {f"rank{rank}": state["meta"] for rank, state in enumerate(stream_states)}


def load_stream_states(path: Path) -> list[dict] | None:
    """Per-rank stream states saved in checkpoint `path` by a streaming run, in rank order; None where it holds none
    (a run on the token cache)."""
    if not (path / STREAM_FILE).exists() and not (path / STREAM_META).exists():
        return None
    read_safetensors_header(path / STREAM_FILE)
    arrays = load_numpy_file(str(path / STREAM_FILE))
    meta = json.loads((path / STREAM_META).read_text(encoding="utf-8"))
    states = []
    for rank in range(len(meta)):
        prefix = f"rank{rank}."
        mine = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        states.append({"arrays": mine, "meta": meta[f"rank{rank}"]})
    return states


# ----------------------------------------------------------------------------------------------- save / load
def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    config: GPTConfig,
    states: tuple[dict, dict],
    trainer_state: dict,
    run_config: dict,
    rng_states: list[dict] | None = None,
    stream_states: list[dict] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write checkpoint `step` atomically: `states` are the model's and optimizer's from `full_state_dicts`;
    `extra_files` (the run's tokenizer's, say) are written beside them, name -> content, and vouched for by the
    manifest alike. Call on the main process only, between two `wait_for_everyone`.

    On any write error (full disk, permissions) the temporary directory is removed, earlier checkpoints are
    untouched, and a UserError says what failed."""
    root = Path(checkpoint_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model_state, optimizer_state = states
        save_file(model_state_for_saving(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        opt_tensors, opt_meta = _optimizer_to_files(optimizer_state)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        _write_json(tmp / OPTIMIZER_META, opt_meta)
        if rng_states is not None:
            rng_tensors, rng_meta = _rng_to_files(rng_states)
            save_file(rng_tensors, str(tmp / RNG_FILE))
            _write_json(tmp / RNG_META, rng_meta)
        if stream_states is not None:
            stream_arrays, stream_meta = _streams_to_files(stream_states)
            save_numpy_file(stream_arrays, str(tmp / STREAM_FILE))
            _write_json(tmp / STREAM_META, stream_meta)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        _write_json(tmp / STATE_FILE, trainer_state)
        _write_json(tmp / CONFIG_FILE, {"model": config.to_dict(), "train": run_config})
        # Hash what is on disk, not what was meant to be written: the manifest vouches for the bytes.
        files = sorted(p for p in tmp.iterdir())
        for f in files:
            _fsync(f)
        manifest = {"step": step, "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}}
        _write_json(tmp / MANIFEST, manifest)
        _fsync(tmp / MANIFEST)
        if final.exists():  # re-saving a step (e.g. after resuming from it): swap, never leave neither
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(root)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"could not write checkpoint {final}: {reason} (earlier checkpoints are intact)") from None
    return final


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all), and temporaries left by killed writers.
    Call from the one process that writes checkpoints. Returns the checkpoints removed."""
    restore_swapped_out(checkpoint_dir)  # before the leftovers below are deleted
    found = list_checkpoints(checkpoint_dir)
    doomed = [path for _, path in found[:-keep_last]] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(checkpoint_dir).glob(".checkpoint_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return doomed


def overwritten_name(*folders: Path) -> str:
    """`overwritten-<time>`, a name free in every one of `folders`: where `--overwrite` moves what it replaces
    (two overwrites within a second get a suffix)."""
    stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), 1
    name = f"overwritten-{stamp}"
    while any((folder / name).exists() for folder in folders):
        suffix += 1
        name = f"overwritten-{stamp}-{suffix}"
    return name


def set_aside_newer(checkpoint_dir: str | Path, step: int) -> Path | None:
    """Move checkpoints later than `step` (an abandoned branch of the run) out of `latest`'s way, not deleting."""
    newer = [path for s, path in list_checkpoints(checkpoint_dir) if s > step]
    if not newer:
        return None
    dest = Path(checkpoint_dir) / f"abandoned-after-{step:06d}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir()
    for path in newer:
        os.replace(path, dest / path.name)
    return dest


def check_model_config(path: Path, model: GPTModel) -> None:
    saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
    saved.pop("vocab_multiple", None)  # a layout, not the network: loading pads or cuts the rows
    requested = model.config.to_dict()
    if saved["context_len"] < requested["context_len"]:
        raise UserError(
            f"context_len {requested['context_len']} exceeds {context_limit(saved.get('position', 'learned'))} of "
            f"checkpoint {path} ({saved['context_len']} tokens)"
        )
    diff = {k: {"checkpoint": v, "requested": requested.get(k)} for k, v in saved.items() if requested.get(k) != v}
    if diff:
        raise UserError(f"checkpoint {path} was trained with a different model config: {diff}")


def check_optimizer_files(path: Path, model: GPTModel) -> dict:
    """Refuse optimizer files that do not hold state for exactly the model's parameters, reading only headers
    and JSON (so every rank can check before any collective). Returns the JSON part."""
    meta = json.loads((path / OPTIMIZER_META).read_text(encoding="utf-8"))
    in_groups = [name for group in meta["param_groups"] for name in group["params"]]
    if any(isinstance(name, int) for name in in_groups):
        raise UserError(
            f"checkpoint {path} was written by an earlier accel_gpt (optimizer state keyed by position) and cannot "
            "be resumed; its weights still load (accel_gpt.analysis.load_model, python -m accel_gpt.export)"
        )
    expected = {name for name, _ in model.named_parameters()}
    _check_names(path / OPTIMIZER_META, set(in_groups), expected)
    keys = [k for k in read_safetensors_header(path / OPTIMIZER_FILE) if k != "__metadata__"] + list(meta["scalars"])
    _check_names(path / OPTIMIZER_FILE, {key.rsplit(".", 1)[0] for key in keys}, expected)
    return meta


def read_trainer_state(path: Path) -> dict:
    """Checkpoint `path`'s trainer state (step, data position, the settings it must be resumed with)."""
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(path: str | Path, model: GPTModel, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights (and optimizer state) from checkpoint directory `path`; returns its trainer state.

    Works for one process, DDP and FSDP alike. When processes are joined, call it on every rank: every rank
    checks the small files, so all fail alike; only rank 0 reads the tensors and broadcasts them (one copy of a
    large model in host memory, not one per process)."""
    path = Path(path)
    check_model_config(path, model)
    check_model_file(path / MODEL_FILE, model)
    if optimizer is not None:
        meta = check_optimizer_files(path, model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    broadcast = dist.is_initialized() and dist.get_world_size() > 1
    reads = not broadcast or dist.get_rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_model_state_dict(model, read_model_state(path / MODEL_FILE, model.config) if reads else {}, options=options)
    if optimizer is not None:
        tensors = fit_vocabulary_padding(load_safetensors(path / OPTIMIZER_FILE), model.config) if reads else {}
        state = _optimizer_from_files(tensors, meta) if reads else {}
        set_optimizer_state_dict(model, optimizer, state, options=options)
        # JSON (and torch's state-dict flattening) turn tuples such as AdamW's betas into lists; "params" is the
        # only list an optimizer's param group holds.
        for group in optimizer.param_groups:
            group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    return read_trainer_state(path)
