"""How text becomes the windows each training step reads: one package, read in this order.

    sources.py    a data path or dataset -> files, each read as documents, piece by piece
    tokens.py     documents -> token shards in the cache, on every core; read back memory-mapped
    cache.py      the content-keyed token cache on disk
    windows.py    tokens -> (input, target) windows -> world-size-independent global batches
    packing.py    documents packed into windows that each start at one (`--align_documents true`)
    mixture.py    several sources, their windows drawn by weight at every step
    streaming.py  the same windows from a stream read while training runs (`--streaming true`)
    run_data.py   a run's data, both modes: `load_training_data`, the one entry point `train.py` calls

Nothing is imported until used, so `python -m accel_gpt.cache` loads only the cache.
"""

# What `accel_gpt.data` held when it was the module of windows (earlier releases), and where each is now.
_MOVED = dict.fromkeys(
    ("WindowDataset", "GlobalBatchSampler", "EpochBatches", "make_loader", "make_eval_loader", "already_collated",
     "eval_bytes_per_token"), "accel_gpt.data.windows",
) | {"TokenStream": "accel_gpt.data.tokens"}  # fmt: skip


def __getattr__(name: str):
    if name in _MOVED:
        from accel_gpt.compat import moved_name

        # Kept here after the first use: `from accel_gpt.data import X` looks X up twice (a package's names may be
        # submodules), and the notice is said once.
        value = globals()[name] = moved_name(__name__, _MOVED[name], name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
