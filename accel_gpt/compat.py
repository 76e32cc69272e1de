"""Names of earlier releases, kept working for one more release: each use says once, in one line, what replaced it.

Modules that lost a name look it up here from their `__getattr__`; `python -m accel_gpt.generate` is `generate.py`.
"""

from __future__ import annotations

import functools
import importlib
import sys
import warnings

# (module, old name) -> (where the new one lives, its name there, how users now write it)
RENAMED = {
    ("accel_gpt.model", "generate"): ("accel_gpt.model", "generate_ids", "accel_gpt.model.generate_ids"),
    ("accel_gpt.errors", "run_command"): ("accel_gpt.cli", "run_command", "accel_gpt.cli.run_command"),
    **{
        ("accel_gpt.analysis", name): ("accel_gpt.inference", name, f"accel_gpt.inference.{name}")
        for name in ("resolve_device", "sliding_window_loss", "corpus_tokens", "is_data_path", "Checkpoint")
    },
    **{
        (module, "generate_text"): ("accel_gpt.compat", "generate_text", "accel_gpt.generate")
        for module in ("accel_gpt", "accel_gpt.model")
    },
    # The notebook API re-exported the trainer before it stopped importing training code.
    ("accel_gpt.analysis", "train"): ("accel_gpt.train", "train", "accel_gpt.train.train"),
    # Two constants of one name and two meanings, told apart.
    **{
        (module, "CHUNK_TOKENS"): (module, new, f"{module}.{new}")
        for module, new in (
            ("accel_gpt.data.tokens", "RECORD_BATCH_TOKENS"),
            ("accel_gpt.data.streaming", "READER_CHUNK_TOKENS"),
        )
    },
}


# Modules that moved into the data package (accel_gpt/data/): the old module is the new one, said on import.
MOVED_MODULES = {
    "accel_gpt.corpus": "accel_gpt.data.sources",
    "accel_gpt.tokens": "accel_gpt.data.tokens",
    "accel_gpt.stream": "accel_gpt.data.streaming",
    "accel_gpt.rundata": "accel_gpt.data.run_data",
}


def notice(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is now {new}; the old name goes in a later release", FutureWarning, stacklevel=stacklevel)


def old_name(module: str, name: str):
    """What `module.name` was, for a module's `__getattr__`; AttributeError for a name it never had."""
    if (module, name) not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home, new_name, shown = RENAMED[module, name]
    new = getattr(importlib.import_module(home), new_name)
    if isinstance(new, type) or not callable(new):  # a class or a constant: said on lookup, as it is used uncalled
        notice(f"{module}.{name}", shown, stacklevel=4)  # above this function and the module's __getattr__
        return new

    @functools.wraps(new)
    def renamed(*args, **kwargs):
        notice(f"{module}.{name}", shown)
        return new(*args, **kwargs)

    return renamed


def moved_module(old: str) -> None:
    """Make module `old` (a file that holds only this call) the module it moved to, for its importer."""
    new = MOVED_MODULES[old]
    notice(old, new)
    sys.modules[old] = importlib.import_module(new)  # the import statement hands over what sys.modules holds


def moved_name(module: str, home: str, name: str):
    """For a module's `__getattr__`: `name` of module `home`, where it moved from `module`, said once per use."""
    try:
        new = getattr(importlib.import_module(home), name)
    except AttributeError:
        raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
    notice(f"{module}.{name}", f"{home}.{name}")
    return new


def generate_text(
    model, start_context: str, max_new_tokens: int, tokenizer, context_size=None, top_k=1, temperature=0.0, top_p=None
) -> str:
    """The text generator of earlier releases (greedy by default), as it was: `accel_gpt.generate` replaces it."""
    import torch

    from accel_gpt.model import generate_ids

    was_training = model.training
    model.eval()
    ids = tokenizer.encode(start_context, allowed_special={"<|endoftext|>"})
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    out = generate_ids(model, idx, max_new_tokens, context_size, temperature=temperature, top_k=top_k, top_p=top_p)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())
