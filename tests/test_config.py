import re
import subprocess
import sys

import pytest
import torch

from accel_gpt.config import TrainConfig, parse_config
from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel


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
        (["--init_from", "hf", "--bias", "false"], "init_from takes the model's shape from hf; drop bias"),
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


def test_help_lists_every_option_with_default():
    out = subprocess.run([sys.executable, "-m", "accel_gpt.train", "--help"], capture_output=True, text=True)
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
