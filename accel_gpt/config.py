"""Training configuration: one typed dataclass, filled from defaults, then a YAML file, then `--key value` flags.

`parse_config(argv)` is the only place that turns user input into a `TrainConfig`; unknown keys and bad values
raise `UserError` with one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from accel_gpt.cli import CommandLineParser
from accel_gpt.data.cache import DEFAULT_DIR as DEFAULT_CACHE_DIR
from accel_gpt.data.mixture import as_config, is_mixture, sources_of
from accel_gpt.errors import UserError
from accel_gpt.model import OPTION_VALUES, PRESETS, GPTConfig

# Upper bounds where a larger value is never meant and would hang or crash the run instead of failing in one line: a
# sample is made at every evaluation and cannot be longer than it is useful to read there; torch takes its thread
# count as a 32-bit integer, and more threads or processes than any machine has cores only oversubscribe it.
MAX_SAMPLE_TOKENS = 1024
# Examples of each --eval_tasks task per evaluation: the standard error of an accuracy near 0.3 is then about 0.02,
# and on 2 CPU cores the mini model scores them in seconds (benchmarks/RESULTS.md, "Task evaluation").
DEFAULT_EVAL_TASK_LIMIT = 500
# The preset of a run that names none. The field itself defaults to None, so that a preset given with init_from
# (which brings its own network) is seen and checked against it.
DEFAULT_MODEL = "mini"
MAX_THREADS = 1024


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


# Options that set the network's shape: layered over a preset; with init_from (which has its own) they may only repeat
# it (plan.model_config_for).
MODEL_SHAPE_OPTIONS = (
    "embedding_dim", "num_layers", "num_heads", "qkv_bias", "bias", "tie_weights", "position", "norm", "qk_norm",
    "activation", "zero_init_projections", "logit_softcap",
)  # fmt: skip


@dataclass
class TrainConfig:
    # --- data
    train_data_path: str | list = _opt(
        "tinyshakespeare",
        "training text: a .txt/.jsonl/.parquet file (.txt and .jsonl also as .gz/.bz2/.xz), a folder written by "
        "datasets' save_to_disk (a DatasetDict's split: FOLDER/train), a directory or glob (laid out in hub splits: "
        "its train files), or a bundled corpus name (the-verdict, tinyshakespeare, xiyouji); or a weighted mixture "
        "of sources, [NAME=]PATH:WEIGHT,... (e.g. books=data/books.txt:3,web=data/web.jsonl:1), or in a config "
        "file a list of sources, each a path or a dataset with its weight (docs/data.md#mixtures)",
    )
    val_data_path: str | None = _opt(
        None,
        "validation text (same forms); if unset, the validation files of a folder laid out in hub splits "
        "(validation-*.parquet, ...), else val_fraction of the training text",
    )
    text_column: str = _opt("text", "the column (.parquet, datasets) or field (.jsonl) that holds the text")
    dataset: str | None = _opt(
        None,
        "a Hugging Face dataset, read with datasets.load_dataset instead of train_data_path: a local folder "
        "laid out like a hub repository, or a hub name already in the local Hugging Face cache "
        "(HF_DATASETS_OFFLINE=1: never reach the Hub)",
    )
    dataset_config: str | None = _opt(None, "the dataset's configuration name (e.g. wikitext-2-raw-v1)")
    train_split: str = _opt("train", "the dataset split to train on")
    val_split: str | None = _opt(
        None,
        "the dataset split to validate on (default: validation when the dataset has one, else val_fraction of "
        "the training split)",
    )
    streaming: bool = _opt(
        False,
        "read the training data while training instead of tokenizing it into the cache first, for corpora too large "
        "to tokenize ahead: documents are tokenized in DataLoader workers, packed into windows and shuffled through "
        "a buffer, and the stream's position is saved with each checkpoint; needs max_steps or a budget in tokens "
        "(docs/data.md#streaming)",
    )
    stream_workers: int = _opt(
        2, "streaming: DataLoader worker processes per process that read and tokenize (0: the training process)"
    )
    shuffle_buffer: int = _opt(1000, "streaming: windows in the shuffle buffer, each step drawn from it (0: in order)")
    val_fraction: float = _opt(0.1, "share of the training tokens held out for validation when val_data_path is unset")
    tokenizer: str = _opt(
        "gpt2",
        "tokenizer: gpt2 (bundled, offline), a folder holding a byte-level BPE tokenizer.json (trained by python -m "
        "accel_gpt.tokenizer train, or a Hugging Face tokenizer's), or any tiktoken encoding name "
        "(docs/tokenizers.md)",
    )
    special_token_id: int | None = _opt(
        None, "end-of-text id appended after every document (default: the tokenizer's, 50256 for gpt2)"
    )
    context_len: int | None = _opt(None, "tokens per training window (default: the preset's context length)")
    stride: int | None = _opt(None, "step between window starts (default: context_len, i.e. no overlap)")
    align_documents: bool = _opt(
        False,
        "start every training window at a document (its end-of-text token first): documents packed best-fit into "
        "windows, the end of one that fits nowhere cut off (docs/data.md#windows-that-start-at-a-document)",
    )
    document_mask: bool = _opt(
        False,
        "attention never crosses a document boundary inside a window: a token sees its own document's tokens alone "
        "(the end-of-text token starts a document)",
    )
    data_cache_dir: str | None = _opt(None, f"where tokenized corpora are cached (default: {DEFAULT_CACHE_DIR})")
    num_proc: int | None = _opt(
        None,
        f"tokenizer processes on each machine, at most {MAX_THREADS} (default: the cores this process may use, at most "
        "12)",
    )
    cache_shard_mb: float = _opt(
        256.0,
        "corpus files are tokenized and cached in shards of about this many MB (consecutive files grouped, a larger "
        "file alone): the unit that machines share out and that a changed file re-tokenizes",
    )
    # --- model
    model: str | None = _opt(
        None,
        f"model preset: {', '.join(PRESETS)}; with init_from the network is what init_from names, and a preset given "
        "too must have its shape (default: mini)",
    )
    embedding_dim: int | None = _opt(None, "override the preset's embedding size")
    num_layers: int | None = _opt(None, "override the preset's number of transformer blocks")
    num_heads: int | None = _opt(None, "override the preset's number of attention heads")
    dropout: float | None = _opt(None, "override the preset's dropout rate")
    qkv_bias: bool | None = _opt(None, "bias in the query/key/value projection (preset default: false)")
    bias: bool | None = _opt(
        None,
        "biases in the LayerNorms and the other linear layers (preset default: true, as GPT-2; false is "
        "nanoGPT's default)",
    )
    tie_weights: bool | None = _opt(None, "share the token embedding with the output head (preset default: false)")
    position: str | None = _opt(None, "positions: learned (GPT-2's table) or rotary (RoPE) (preset default: learned)")
    norm: str | None = _opt(None, "normalisation: layernorm (GPT-2's) or rmsnorm (preset default: layernorm)")
    qk_norm: bool | None = _opt(None, "RMS-normalise queries and keys per head (preset default: false)")
    activation: str | None = _opt(None, "MLP activation: gelu (GPT-2's) or relu2, ReLU squared (preset default: gelu)")
    zero_init_projections: bool | None = _opt(
        None, "start the attention and MLP output projections at zero (preset default: false)"
    )
    logit_softcap: float | None = _opt(
        None, "soft-cap the logits at this value, c * tanh(logits / c); 0 for none (preset default: 0)"
    )
    vocab_multiple: int = _opt(
        64,
        "round the embedding and output-head rows up to a multiple of this, for faster matmuls; the padding "
        "rows are never predicted (1: no padding)",
    )
    init_from: str | None = _opt(
        None,
        "start a new run from trained weights instead of a preset: an accel_gpt checkpoint or run directory, or a "
        "local Hugging Face GPT-2 folder (config.json + model.safetensors); their network's shape, nothing else",
    )
    # --- optimisation
    optimizer: str = _opt(
        "adamw", "adamw (every parameter), or muon (the hidden matrices; AdamW for embeddings, head, norms, biases)"
    )
    learning_rate: float = _opt(1e-3, "peak learning rate, reached after warmup (with muon: AdamW's parameters')")
    muon_learning_rate: float = _opt(
        1e-3, "with optimizer muon: the hidden matrices' peak learning rate (on AdamW's scale), following the schedule"
    )
    lr_schedule: str = _opt(
        "cosine",
        "cosine (warmup, then cosine decay to min_lr at the last step) or wsd (warmup, constant, then a decay to "
        "min_lr over the last decay_fraction of the run)",
    )
    decay_fraction: float = _opt(0.2, "with lr_schedule wsd: the share of the run over which the rate decays")
    wsd_decay: str = _opt("linear", "with lr_schedule wsd: the decay's shape, linear or 1-sqrt")
    initial_lr: float = _opt(1e-5, "learning rate at step 0, the start of the linear warmup")
    min_lr: float = _opt(1e-4, "learning rate at the last step, the end of the cosine decay")
    warmup_steps: int = _opt(20, "optimizer steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to biases and norm weights)")
    max_norm: float = _opt(1.0, "gradient-norm clipping threshold, applied after warmup")
    batch_size: int = _opt(8, "windows per process per micro-batch")
    global_batch_size: int | None = _opt(
        None, "windows per optimizer step over all processes; derives gradient_accumulation_steps when set"
    )
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step (ignored if global_batch_size is set)")
    num_epochs: int = _opt(1, "passes over the training data (unless max_steps or a budget in tokens is set)")
    max_steps: int | None = _opt(None, "optimizer steps to run, overriding num_epochs (none: num_epochs' worth)")
    train_tokens: int | None = _opt(
        None, "tokens to train on: max_steps becomes as many steps as they fill, rounded up (instead of max_steps)"
    )
    tokens_per_parameter: float | None = _opt(
        None, "tokens to train on per model parameter (Chinchilla's compute-optimal ~20), instead of max_steps"
    )
    seed: int = _opt(123, "seed for weights, shuffling and dropout")
    compile: bool = _opt(False, "torch.compile the model (pays off on GPUs; see benchmarks/RESULTS.md)")
    compile_mode: str = _opt(
        "default",
        "torch.compile mode: default, reduce-overhead (CUDA graphs: for small models bound by the host), "
        "max-autotune, max-autotune-no-cudagraphs",
    )
    cuda_graph: bool = _opt(
        False,
        "capture each optimizer step (forward, backward, clipping, update) as one CUDA graph and replay it: "
        "the host launches one graph instead of every kernel, which bounds small models; one process on one GPU, "
        "bf16 or fp32",
    )
    attention: str = _opt("auto", "preferred attention kernel: auto (torch's choice), cudnn, flash, efficient, math")
    memory_check: bool = _opt(
        True,
        "stop before building the model when the estimate of what a process needs (weights, gradients, optimizer "
        "state, activations of a micro-batch) exceeds its device's free memory; false: try anyway",
    )
    activation_checkpointing: bool = _opt(
        False, "recompute each block's activations in backward: less memory, about a third more compute"
    )
    loss_chunk: int | None = _opt(
        None, "tokens per chunk of the fused loss, 0 for plain cross-entropy (default: 4096 on CPU, 0 on GPUs)"
    )
    tf32: bool = _opt(True, "allow TF32 matmuls for fp32 work on Ampere and newer GPUs")
    peak_flops: float | None = _opt(
        None, "per-device peak FLOP/s for MFU (default: data sheet for known GPUs, a measured matmul on CPU)"
    )
    cpu_threads: int | None = _opt(
        None,
        f"torch threads per process when training on CPU, at most {MAX_THREADS} (default: this machine's cores / local "
        "processes)",
    )
    # --- evaluation and logging
    eval_freq: int = _opt(
        50,
        "evaluate train/val loss and print a sample every N optimizer steps and at the end (0: never, e.g. for "
        "throughput runs)",
    )
    eval_iter: int = _opt(
        5,
        "global batches averaged for each train/val loss estimate: the first ones of each split, in corpus order, "
        "the same windows at any number of processes",
    )
    eval_tasks: str | None = _opt(
        None,
        "task files scored at every evaluation, PATH[,PATH...] (NAME=PATH names one): JSONL in the forms of "
        "docs/evaluation.md (HellaSwag, LAMBADA, multiple choice, completion), scored as lm-evaluation-harness does; "
        "logged as <task>/acc, <task>/acc_norm or <task>/perplexity",
    )
    eval_task_limit: int = _opt(
        DEFAULT_EVAL_TASK_LIMIT, "examples of each task scored at every evaluation: its first ones, shared out to ranks"
    )
    log_every: int | None = _opt(
        None,
        "bring losses and gradient norms to the host every N steps (still one record per step); between, the "
        "GPU never waits for the host (default: 1 on CPU, 10 on GPUs)",
    )
    start_context: str = _opt("Every effort moves you", "prompt for the greedy sample printed at evaluation")
    sample_tokens: int = _opt(
        50,
        f"tokens generated for each sample, at most {MAX_SAMPLE_TOKENS} (a glance at the model; longer text: python -m "
        "accel_gpt.sample)",
    )
    output_dir: str | None = _opt(
        None, "run directory: config, metrics.jsonl, samples (default: runs/<model>-<date>-<time>, made for the run)"
    )
    report_to: str = _opt(
        "none",
        "experiment trackers that get every metrics.jsonl record, through Accelerate: none, all (every installed "
        "one), or a comma-separated list of tensorboard, wandb, mlflow, trackio, aim, comet_ml, clearml, dvclive, "
        "swanlab",
    )
    project_name: str = _opt("accel_gpt", "tracker project name (TensorBoard: <output_dir>/trackers/<project_name>)")
    run_name: str | None = _opt(None, "tracker run name (default: the run directory's name)")
    # --- checkpoints
    checkpoint_dir: str | None = _opt(None, "where checkpoints go (default: <output_dir>/checkpoints)")
    save_freq: int = _opt(100, "save a checkpoint every N optimizer steps (and always at the end)")
    checkpoint: str | None = _opt(
        None,
        "resume from checkpoint step N, 'latest' (the newest that verifies), or 'auto' (latest if there is one, "
        "else start a new run: one command for a job that is requeued)",
    )
    overwrite: bool = _opt(
        False,
        "start a new run in an output_dir/checkpoint_dir that holds one; the old run's files are moved into "
        "overwritten-<time>/ inside it, never deleted",
    )
    keep_last: int = _opt(3, "keep only the newest N checkpoints (0 keeps all)")
    max_nonfinite_steps: int = _opt(
        5,
        "stop with an error after this many optimizer steps in a row with a non-finite gradient norm (each is skipped)",
    )

    def model_config(self, vocabulary_size: int) -> GPTConfig:
        """The preset with every model field that was set here layered on top."""
        sizes = dict(PRESETS[self.model or DEFAULT_MODEL], vocabulary_size=vocabulary_size)
        for name in (*MODEL_SHAPE_OPTIONS, "dropout", "context_len"):
            if getattr(self, name) is not None:
                sizes[name] = getattr(self, name)
        sizes["vocab_multiple"] = self.vocab_multiple
        try:
            return GPTConfig(**sizes)
        except ValueError as err:
            raise UserError(f"model config: {err}") from None

    def token_cache_dir(self) -> Path:
        return Path(self.data_cache_dir or DEFAULT_CACHE_DIR).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _base_type(hint) -> type:
    """`int | None` -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Annotations are strings under `from __future__ import annotations`: evaluated once, for every field at a time.
_TYPES = {name: _base_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items()}
_OPTIONAL = {name for name, f in _FIELDS.items() if "None" in str(f.type)}  # fields that may be unset
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _coerce(key: str, value, source: str):
    """Convert a YAML or command-line value to the field's type, or raise one clear line."""
    kind, optional = _TYPES[key], key in _OPTIONAL
    if key in LIST_OPTIONS:
        if isinstance(value, str) and value.lstrip().startswith("["):  # the config file's list, written inline
            try:
                value = yaml.load(value, Loader=_Loader)
            except yaml.YAMLError as err:
                raise UserError(f"{source}: {key} is not a valid YAML list: {str(err).splitlines()[0]}") from None
        if isinstance(value, list):
            return value
    if not isinstance(value, (str, int, float, bool, type(None))):  # a YAML list, map or other structure
        shown = {list: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")
        raise UserError(f"{source}: {key} expects {_EXPECTED[kind]}, got {shown} ({value!r})")
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and optional):
        if optional:
            return None
        raise UserError(f"{source}: {key} cannot be empty")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if not isinstance(value, str):
                return int(value)
            try:
                return int(value.replace("_", ""))
            except ValueError:  # a count in scientific notation, as YAML reads it too: --train_tokens 1e9
                number = float(value)
                if not number.is_integer():
                    raise
                return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except ValueError:
        raise UserError(f"{source}: {key} expects {_EXPECTED[kind]}, got {value!r}") from None


def _resolve_config_file(name: str) -> Path:
    """A path, or the name of a config shipped with the package (e.g. `xiyouji`)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = resources.files("accel_gpt") / "configs" / f"{path.stem}.yaml"
    if not path.suffix and bundled.is_file():
        return Path(str(bundled))
    raise UserError(f"config file not found: {name}")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 integers: `checkpoint: 000200` (as in the directory name) is 200, not YAML 1.1's octal 128, and
    `1:30` stays a string instead of becoming the base-60 number 90. No field holds a date: `2024-01-01` stays the
    text it is (a run_name, say)."""


_INT, _TIMESTAMP = "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10)


_Loader.add_constructor(_INT, _construct_int)


def load_yaml(name: str) -> dict:
    path = _resolve_config_file(name)
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_Loader) or {}
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text ({err.reason} at byte offset {err.start})") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    return data


def build_parser() -> argparse.ArgumentParser:
    # Defaults are SUPPRESSed so that only flags the user typed override the YAML file; --help still shows them.
    parser = CommandLineParser(
        prog="accelerate launch -m accel_gpt.train",
        description="Pretrain a GPT-2 model. Values come from the defaults, then --config FILE, then the flags below.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of key: value pairs, or a bundled config name (e.g. xiyouji)")
    for name, f in _FIELDS.items():
        metavar = {bool: "true|false"}.get(_TYPES[name], _TYPES[name].__name__.upper())
        text = f.metadata["help"]
        if "default" not in text:  # a help text that explains its default already says it better than "none"
            text += f" (default: {'none' if f.default is None else f.default})"
        parser.add_argument(f"--{name}", metavar=metavar, help=text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML (`--config`) <- command-line flags. Raises UserError on unknown keys or bad values."""
    given = vars(build_parser().parse_args(argv))
    values: dict = {}
    if "config" in given:
        for key, value in load_yaml(given.pop("config")).items():
            if key not in _FIELDS:
                raise UserError(f"config file: unknown key {key!r}")
            values[key] = _coerce(key, value, "config file")
    if any(key in given for key in RUN_LENGTHS):  # a length on the command line replaces the config file's
        values = {key: value for key, value in values.items() if key not in RUN_LENGTHS}
    for key, value in given.items():
        values[key] = _coerce(key, value, "command line")
    return validate(TrainConfig(**values))


# torch.compile modes that capture CUDA graphs of the model themselves (cudagraph trees).
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


# Path options: a notebook passes pathlib.Path objects, the config keeps their text.
PATH_OPTIONS = (
    "train_data_path", "val_data_path", "dataset", "data_cache_dir", "init_from", "output_dir", "checkpoint_dir",
    "eval_tasks", "tokenizer",
)  # fmt: skip
AT_LEAST_ONE = (
    "batch_size", "gradient_accumulation_steps", "num_epochs", "eval_iter", "save_freq", "max_nonfinite_steps",
    "vocab_multiple", "max_steps", "global_batch_size", "context_len", "stride", "cpu_threads", "embedding_dim",
    "num_layers", "num_heads", "log_every", "num_proc", "eval_task_limit", "train_tokens",
)  # fmt: skip
AT_LEAST_ZERO = (
    "warmup_steps", "keep_last", "eval_freq", "loss_chunk", "sample_tokens", "special_token_id", "stream_workers",
    "shuffle_buffer", "logit_softcap",
)  # fmt: skip
# Negative rates run training backwards (gradient ascent) or explode; NaN passes every `<` test, so finiteness too.
NON_NEGATIVE_FINITE = ("learning_rate", "initial_lr", "min_lr", "weight_decay", "muon_learning_rate")
POSITIVE_FINITE = ("peak_flops", "cache_shard_mb", "tokens_per_parameter")
MAX_LEARNING_RATE = 1.0
RUN_LENGTHS = ("max_steps", "train_tokens", "tokens_per_parameter")  # each alone sets the run's length
LIST_OPTIONS = ("train_data_path",)  # may hold a list (a mixture's sources)
AT_MOST = {"sample_tokens": MAX_SAMPLE_TOKENS, "cpu_threads": MAX_THREADS, "num_proc": MAX_THREADS}


def _typed(key: str, value):
    """`value` as field `key`'s type (an int for a float field, a Path for a path, a step number for checkpoint),
    or one UserError: the Python API gets the same checks as the command line, whose text _coerce converts."""
    kind = _TYPES[key]
    if value is None:
        if key in _OPTIONAL:
            return None
        raise UserError(f"{key} cannot be None")
    if key in PATH_OPTIONS and isinstance(value, os.PathLike):
        return os.fspath(value)
    if key in LIST_OPTIONS and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, bool):  # a bool is an Integral too
        if kind is bool:
            return value
    elif kind is int and isinstance(value, numbers.Integral):
        return int(value)
    elif kind is float and isinstance(value, numbers.Real):
        return float(value)
    elif kind is str and isinstance(value, str):
        return value
    elif key == "checkpoint" and isinstance(value, numbers.Integral):
        return str(value)
    raise UserError(f"{key} expects {_EXPECTED[kind]}, got {value!r} ({type(value).__name__})")


def validate(cfg: TrainConfig) -> TrainConfig:
    """The checked configuration, with every value in its field's type; the first bad value is one UserError
    naming its field. Both the command line (`parse_config`) and `train(TrainConfig(...))` come through here."""
    if not isinstance(cfg, TrainConfig):
        raise UserError(f"expected a TrainConfig, got {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg, **{key: _typed(key, getattr(cfg, key)) for key in _FIELDS})
    if cfg.model is None and not cfg.init_from:
        cfg = dataclasses.replace(cfg, model=DEFAULT_MODEL)
    if cfg.model is not None and cfg.model not in PRESETS:
        raise UserError(f"unknown model preset {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in AT_LEAST_ZERO:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise UserError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key, most in AT_MOST.items():
        if getattr(cfg, key) is not None and getattr(cfg, key) > most:
            raise UserError(f"{key} must be at most {most}, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE_FINITE:
        if not 0.0 <= getattr(cfg, key) < math.inf:
            raise UserError(f"{key} must be a finite number >= 0, got {getattr(cfg, key)}")
    if not cfg.max_norm > 0.0:
        raise UserError(f"max_norm must be > 0 (inf turns clipping off), got {cfg.max_norm}")
    for key in POSITIVE_FINITE:
        if getattr(cfg, key) is not None and not 0.0 < getattr(cfg, key) < math.inf:
            raise UserError(f"{key} must be a finite number > 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.seed < 2**32:  # numpy's global seed takes 32 bits
        raise UserError(f"seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    for key in ("text_column", "train_split", "val_split", "dataset", "dataset_config"):
        if getattr(cfg, key) == "":
            raise UserError(f"{key} must not be empty")
    if not cfg.start_context:
        raise UserError("start_context must not be empty: the sample needs a prompt to continue")
    if not 0.0 < cfg.decay_fraction <= 1.0:
        raise UserError(f"decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    if cfg.optimizer == "muon" and cfg.learning_rate == 0.0:
        raise UserError("optimizer muon schedules muon_learning_rate as a multiple of learning_rate: set it above 0")
    if cfg.optimizer == "muon" and cfg.cuda_graph:
        raise UserError("cuda_graph captures AdamW's step only: use optimizer adamw with cuda_graph")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.dataset is not None and cfg.val_data_path is not None:
        raise UserError("dataset brings its own splits: choose the validation one with val_split, not val_data_path")
    if cfg.eval_tasks is not None and cfg.eval_freq == 0:
        raise UserError("eval_tasks are scored at evaluations: set eval_freq above 0")
    lengths = [key for key in RUN_LENGTHS if getattr(cfg, key) is not None]
    if len(lengths) > 1:
        raise UserError(f"{lengths[0]} and {lengths[1]} both set the run's length: give one of them")
    if cfg.streaming and not lengths:
        raise UserError(
            "streaming reads a corpus of unknown length: set max_steps, train_tokens or tokens_per_parameter"
        )
    if cfg.align_documents and cfg.stride is not None and cfg.stride != cfg.context_len:
        raise UserError("align_documents packs windows that never overlap: drop stride")
    if is_mixture(cfg.train_data_path):
        cfg = check_mixture(cfg, lengths)
    elif cfg.dataset is None and cfg.val_data_path is None and cfg.val_fraction == 0.0 and not cfg.streaming:
        raise UserError("no validation data: set val_data_path or a val_fraction above 0")
    choices = {
        "attention": ("auto", "cudnn", "flash", "efficient", "math"),
        "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "optimizer": ("adamw", "muon"),
        "lr_schedule": ("cosine", "wsd"),
        "wsd_decay": ("linear", "1-sqrt"),
        **{name: (None, *values) for name, values in OPTION_VALUES.items()},
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(v for v in allowed if v)}, got {getattr(cfg, key)!r}")
    if cfg.cuda_graph and cfg.compile and cfg.compile_mode in CUDAGRAPH_COMPILE_MODES:
        raise UserError(
            f"cuda_graph captures the whole step itself; compile_mode {cfg.compile_mode} would graph the "
            "model inside it: use compile_mode default or max-autotune-no-cudagraphs"
        )
    if cfg.cuda_graph and cfg.activation_checkpointing:
        raise UserError(
            "cuda_graph does not combine with activation_checkpointing yet (its recomputation saves and "
            "restores the RNG state, which is not tested under a capture)"
        )
    for key in ("learning_rate", "muon_learning_rate", "initial_lr", "min_lr"):
        if getattr(cfg, key) > MAX_LEARNING_RATE:
            raise UserError(
                f"{key} must be at most {MAX_LEARNING_RATE:g}, got {getattr(cfg, key)}: AdamW and Muon move each "
                "weight by about the rate at every step, and GPT's weights are about 0.02 in size"
            )
    for key in ("min_lr", "initial_lr"):  # the schedule rises from initial_lr to the peak and decays to min_lr
        if getattr(cfg, key) > cfg.learning_rate:
            raise UserError(f"{key} ({getattr(cfg, key)}) is larger than learning_rate ({cfg.learning_rate})")
    peak = max(cfg.learning_rate, cfg.muon_learning_rate if cfg.optimizer == "muon" else 0.0)
    if cfg.weight_decay * peak >= 1.0:
        raise UserError(
            f"weight_decay x learning_rate must be below 1, got {cfg.weight_decay} x {peak}: each step multiplies the "
            "weights by 1 - learning_rate x weight_decay, which would zero or flip them"
        )
    if cfg.checkpoint is not None and cfg.checkpoint not in ("latest", "auto") and not cfg.checkpoint.isdecimal():
        raise UserError(f"checkpoint must be a step number, 'latest' or 'auto', got {cfg.checkpoint!r}")
    if cfg.checkpoint is not None and cfg.overwrite:
        raise UserError("overwrite starts a new run and checkpoint continues one: pass only one of them")
    if cfg.checkpoint is not None and cfg.output_dir is None and cfg.checkpoint_dir is None:
        raise UserError("checkpoint needs the run to resume: pass its --output_dir (or --checkpoint_dir)")
    return cfg


def check_mixture(cfg: TrainConfig, lengths: list[str]) -> TrainConfig:
    """A config whose train_data_path is a mixture, checked (each source, and what a mixture cannot combine with);
    a list of sources comes back in the config file's form."""
    sources = sources_of(cfg)
    if cfg.dataset is not None:
        raise UserError("dataset and a mixture in train_data_path: make the dataset one of the mixture's sources")
    if cfg.val_data_path is not None:
        raise UserError(
            "each source of a mixture is validated on its own: give a source's validation files as its val_path "
            "instead of val_data_path"
        )
    if not lengths:
        raise UserError(
            "a mixture's sources run out at different steps: set its length with max_steps, train_tokens or "
            "tokens_per_parameter"
        )
    if isinstance(cfg.train_data_path, list):
        cfg = dataclasses.replace(cfg, train_data_path=as_config(sources))
    return cfg
