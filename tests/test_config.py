import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import VERDICT, assert_one_line_error, in_process

from accel_gpt.config import (
    AT_LEAST_ONE,
    AT_LEAST_ZERO,
    NON_NEGATIVE_FINITE,
    POSITIVE_FINITE,
    TrainConfig,
    parse_config,
    validate,
)
from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel
from accel_gpt.train import main as train_main
from accel_gpt.train import train


def test_defaults_then_yaml_then_command_line(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "batch_size: 4\nlearning_rate: 3.0e-4\nqkv_bias: true\nstart_context: 孙悟空\n", encoding="utf-8"
    )
    cfg = parse_config(["--config", str(cfg_file), "--learning_rate", "1e-3", "--max_steps", "none"])
    assert cfg.batch_size == 4 and cfg.qkv_bias is True and cfg.start_context == "孙悟空"
    assert cfg.learning_rate == 1e-3  # the flag beats the file
    assert cfg.max_steps is None
    assert cfg.weight_decay == TrainConfig().weight_decay  # untouched default


def test_bundled_xiyouji_config_resolves_by_name():
    cfg = parse_config(["--config", "xiyouji"])
    assert cfg.train_data_path == "xiyouji"
    assert any("\u4e00" <= ch <= "\u9fff" for ch in cfg.start_context)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_key", "1"], "unrecognized arguments: --no_such_key"),
        (["--batch_size", "eight"], "batch_size expects an integer, got 'eight'"),
        (["--qkv_bias", "maybe"], "qkv_bias expects true or false"),
        (["--min_lr", "1", "--learning_rate", "0.1"], "min_lr (1.0) is larger than learning_rate"),
        (["--model", "gpt5"], "unknown model preset 'gpt5'"),
        (["--checkpoint", "last"], "checkpoint must be a step number, 'latest' or 'auto'"),
        (["--checkpoint", "\u00b2"], "checkpoint must be a step number"),  # a digit to str.isdigit, not to int()
        (["--checkpoint", "latest"], "checkpoint needs the run to resume: pass its --output_dir"),
        (["--checkpoint", "auto"], "checkpoint needs the run to resume: pass its --output_dir"),
        (["--checkpoint", "auto", "--output_dir", "r", "--overwrite", "true"], "overwrite starts a new run and"),
        (["--config", "/no/such.yaml"], "config file not found"),
        (["--attention", "fast"], "attention must be one of auto, cudnn, flash, efficient, math, got 'fast'"),
        (["--compile_mode", "turbo"], "compile_mode must be one of default, reduce-overhead"),
        (["--log_every", "0"], "log_every must be positive, got 0"),
        (
            ["--cuda_graph", "true", "--compile", "true", "--compile_mode", "reduce-overhead"],
            "cuda_graph captures the whole step itself; compile_mode reduce-overhead would graph the model",
        ),
        (
            ["--cuda_graph", "true", "--activation_checkpointing", "true"],
            "cuda_graph does not combine with activation_checkpointing",
        ),
        (["--vocab_multiple", "0"], "vocab_multiple must be positive, got 0"),
        (["--eval_freq", "-1"], "eval_freq must be >= 0, got -1"),
    ],
)
def test_bad_values_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(argv)


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rat'"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: [1, 2]\n", "config file: learning_rate expects a number, got a list ([1, 2])"),
        ("batch_size: {a: 1}\n", "config file: batch_size expects an integer, got a mapping ({'a': 1})"),
        ("learning_rate: 2024-01-01\n", "config file: learning_rate expects a number, got '2024-01-01'"),
        (b"run_name: caf\xe9\n", "is not UTF-8 text (invalid continuation byte at byte offset 13)"),
    ],
    ids=["list", "map", "date", "latin-1"],
)
def test_a_yaml_value_of_the_wrong_shape_or_a_file_that_is_not_utf8_is_one_line(tmp_path, capfd, text, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(in_process(train_main, ["--config", path], capfd), message)


def test_a_yaml_date_is_the_text_it_reads_for_a_text_option(tmp_path):
    (tmp_path / "run.yaml").write_text("run_name: 2024-01-01\nstart_context: 2024-01-01 10:00\n")
    cfg = parse_config(["--config", str(tmp_path / "run.yaml")])
    assert (cfg.run_name, cfg.start_context) == ("2024-01-01", "2024-01-01 10:00")


def test_help_lists_every_option_with_default(capfd):
    out = in_process(train_main, ["--help"], capfd)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in text
    assert "(default: 0.001)" in text and "(default: mini)" in text
    # A help text that explains its own default is not followed by a second "(default: none)".
    assert not re.search(r"default[^()]*\) \(default", text), re.findall(
        r"\([^()]*default[^()]*\) \(default: [^)]*\)", text
    )
    assert "(default: the tokenizer's, 50256 for gpt2) --" in text and "(default: none)" in text


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "accel_gpt.train", "--batch_size", "x"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "accel_gpt: error: command line: batch_size expects an integer, got 'x'"


def test_yaml_numbers_are_read_as_written(tmp_path):
    """Zero-padded steps, as in checkpoint_000200, are decimal (YAML 1.1 would read octal 128)."""
    (tmp_path / "run.yaml").write_text(
        "checkpoint: 000200\noutput_dir: runs/x\nsave_freq: 010\nmax_steps: 1_000\nstart_context: 1:30\nseed: 0x10\n"
    )
    cfg = parse_config(["--config", str(tmp_path / "run.yaml")])
    assert (cfg.checkpoint, cfg.save_freq, cfg.max_steps, cfg.start_context, cfg.seed) == ("200", 10, 1000, "1:30", 16)


def test_bundled_article_config_is_the_articles_run():
    cfg = parse_config(["--config", "article_gpt2_small", "--max_steps", "2"])
    assert (cfg.model, cfg.context_len, cfg.stride, cfg.batch_size, cfg.train_data_path) == (
        "gpt2-small",
        1024,
        1024,
        2,
        "xiyouji",
    )
    assert (cfg.learning_rate, cfg.initial_lr, cfg.warmup_steps, cfg.min_lr) == (6e-4, 3e-5, 10, 1e-6)
    assert (cfg.weight_decay, cfg.max_norm, cfg.global_batch_size, cfg.gradient_accumulation_steps) == (
        0.1,
        1.0,
        None,
        1,
    )
    assert any("\u4e00" <= ch <= "\u9fff" for ch in cfg.start_context)
    with torch.device("meta"):
        model = GPTModel(cfg.model_config(50257))
    assert model.num_parameters() == 163_009_536 and model.config.context_len == 1024


BAD_VALUES = [
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"model": "tinyy"}, "unknown model preset 'tinyy'"),
    ({"learning_rate": "3e-4"}, "learning_rate expects a number, got '3e-4' (str)"),
    ({"max_norm": -1.0}, "max_norm must be > 0 (inf turns clipping off), got -1.0"),
    ({"max_norm": 0}, "max_norm must be > 0 (inf turns clipping off), got 0.0"),
    ({"max_norm": float("nan")}, "max_norm must be > 0"),
    ({"learning_rate": -1.0, "min_lr": -2.0}, "learning_rate must be a finite number >= 0, got -1.0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number >= 0, got nan"),
    ({"weight_decay": -3.0}, "weight_decay must be a finite number >= 0, got -3.0"),
    ({"initial_lr": -5.0}, "initial_lr must be a finite number >= 0, got -5.0"),
    ({"min_lr": -1e-5}, "min_lr must be a finite number >= 0"),
    ({"num_proc": -1}, "num_proc must be positive, got -1"),
    ({"num_proc": 0}, "num_proc must be positive, got 0"),
    ({"seed": -1}, "seed must be in [0, 2**32), got -1"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
    ({"warmup_steps": 5, "max_steps": 5}, "warmup_steps (5) must be shorter than the run (5 steps)"),
    ({"special_token_id": 50257}, "special_token_id 50257 is outside the gpt2 vocabulary (0..50256)"),
    ({"special_token_id": -1}, "special_token_id must be >= 0, got -1"),
    ({"peak_flops": 0.0}, "peak_flops must be a finite number > 0"),
    ({"sample_tokens": -1}, "sample_tokens must be >= 0, got -1"),
    ({"sample_tokens": 200000}, "sample_tokens must be at most 1024, got 200000"),
    ({"cpu_threads": 3000000000}, "cpu_threads must be at most 1024, got 3000000000"),
    ({"num_proc": 10**6}, "num_proc must be at most 1024, got 1000000"),
    ({"learning_rate": 1e30}, "learning_rate must be at most 1, got 1e+30"),
    ({"weight_decay": 1e30}, "weight_decay x learning_rate must be below 1, got 1e+30 x 0.001"),
    ({"initial_lr": 0.01}, "initial_lr (0.01) is larger than learning_rate (0.001)"),
    ({"batch_size": 2.0}, "batch_size expects an integer, got 2.0 (float)"),
    ({"compile": 1}, "compile expects true or false, got 1 (int)"),
    ({"train_data_path": None}, "train_data_path cannot be None"),
    ({"output_dir": 3}, "output_dir expects a string, got 3 (int)"),
    ({"checkpoint": -2, "output_dir": "r"}, "checkpoint must be a step number, 'latest' or 'auto', got '-2'"),
    ({"global_batch_size": 12, "batch_size": 8}, "global_batch_size 12 is not a multiple of batch_size x processes"),
    ({"embedding_dim": 30, "num_heads": 4}, "model config:"),
    ({"tokenizer": "no_such_encoding"}, "unknown tokenizer 'no_such_encoding'"),
    ({"max_steps": 5, "train_tokens": 1000}, "max_steps and train_tokens both set the run's length: give one of them"),
    ({"train_tokens": 10**6, "tokens_per_parameter": 20.0}, "train_tokens and tokens_per_parameter both set"),
    ({"train_tokens": 0}, "train_tokens must be positive, got 0"),
    ({"tokens_per_parameter": -20.0}, "tokens_per_parameter must be a finite number > 0, got -20.0"),
    ({"tokens_per_parameter": float("inf")}, "tokens_per_parameter must be a finite number > 0, got inf"),
    (
        {"train_tokens": 512, "warmup_steps": 20},
        "must be shorter than the run (1 steps: 1,024 tokens for train_tokens 512",
    ),
]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_python_api_refuses_bad_values_before_any_work(values, message, tmp_path, monkeypatch, capsys):
    """train(TrainConfig(...)) checks exactly what the command line checks: one UserError naming the field,
    before the run directory or the token cache is touched; the CLI prints the same message as one line."""
    monkeypatch.chdir(tmp_path)
    values = {"output_dir": str(tmp_path / "run"), "data_cache_dir": str(tmp_path / "cache")} | values
    with pytest.raises(UserError) as caught:
        train(TrainConfig(**values))
    assert message in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run directory, no cache, nothing tokenized
    if "expects" in message or "cannot be None" in message:
        return  # a Python type the command line has no spelling for: its text is converted (test above)
    argv = [f"--{key}={value}" for key, value in values.items()]  # =: argparse takes -1e-05 for a flag
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"accel_gpt: error: {caught.value}\n"


def test_a_bare_config_has_the_default_model():
    assert TrainConfig().model_config(50257).embedding_dim == 128  # mini, before validate too
    assert validate(TrainConfig()).model == "mini" and validate(TrainConfig(init_from="run")).model is None


def test_paths_may_be_path_objects_and_checkpoint_a_step_number(tmp_path):
    cfg = validate(TrainConfig(train_data_path=tmp_path / "corpus.txt", output_dir=tmp_path, checkpoint=200))
    assert cfg.train_data_path == str(tmp_path / "corpus.txt") and cfg.output_dir == str(tmp_path)
    assert cfg.checkpoint == "200"
    assert validate(TrainConfig(learning_rate=1, max_norm=float("inf"))).learning_rate == 1.0  # ints are numbers


def test_every_numeric_option_has_a_range_check():
    """A new numeric option must be given its range (or be listed here with the reason it needs none)."""
    checked = set(AT_LEAST_ONE) | set(AT_LEAST_ZERO) | set(NON_NEGATIVE_FINITE) | set(POSITIVE_FINITE)
    checked |= {"max_norm", "seed", "dropout", "val_fraction", "decay_fraction"}
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if re.match(r"(int|float)\b", str(f.type))}
    assert numeric - checked == set()


def test_a_budget_in_tokens_sets_the_run_length_and_says_so(tmp_path, train_here):
    """train_tokens fills whole steps (rounded up); tokens_per_parameter is that many tokens per parameter."""
    from accel_gpt.plan import plan_run

    args = ["--model", "tiny", "--batch_size", "2", "--context_len", "64", "--warmup_steps", "1"]
    assert plan_run(parse_config([*args, "--train_tokens", "1000"]), 1).max_steps == 8  # 1,000 / 128 tokens a step
    per_parameter = plan_run(parse_config([*args, "--tokens_per_parameter", "0.001"]), 2)
    assert per_parameter.max_steps == 26  # 6,536.7 tokens in steps of 2 processes x 2 x 64 tokens
    assert per_parameter.token_budget == "6,656 tokens for tokens_per_parameter 0.001 x 6,536,704 parameters"
    run = ["--train_data_path", VERDICT, "--output_dir", tmp_path / "run", "--data_cache_dir", tmp_path / "c"]
    result = train_here(*args, *run, "--train_tokens", "300", "--eval_freq", "0", "--sample_tokens", "0")
    assert result.returncode == 0, result.stderr
    assert "| 3 steps = 384 tokens for train_tokens 300 (" in result.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # A length on the command line replaces the config file's (the bundled xiyouji config sets max_steps).
    assert parse_config(["--config", "xiyouji", "--train_tokens", "1000"]).max_steps is None
    assert parse_config(["--train_tokens", "2.5e6"]).train_tokens == 2_500_000  # as YAML reads 2.5e6
    with pytest.raises(UserError, match="train_tokens expects an integer, got '2.5e-1'"):
        parse_config(["--train_tokens", "2.5e-1"])
