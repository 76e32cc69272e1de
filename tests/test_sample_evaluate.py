"""The sample and evaluate command lines on a real (tiny) checkpoint, and streaming decoding of split characters."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import REPO, VERDICT, assert_one_line_error, in_process, run_module, run_python

from accel_gpt import analysis
from accel_gpt import sample as sample_cli
from accel_gpt.errors import UserError
from accel_gpt.evaluate import main as evaluate_main
from accel_gpt.tokenizer import TextStream, get_tokenizer

pytestmark = pytest.mark.slow  # every test here starts processes or trains


CHINESE = "话说孙悟空，花果山水帘洞美猴王。Every effort moves you 🐒"


@pytest.fixture
def run(tiny_run):
    return {"dir": tiny_run.out, "cache": tiny_run.cache}


def cli(module, *args, stdin=None):
    return run_module(module, *args, stdin=stdin)


def test_text_stream_prints_only_complete_characters():
    enc = get_tokenizer("gpt2")
    ids = enc.encode_ordinary(CHINESE)
    assert any("\ufffd" in enc.decode([i]) for i in ids)  # the tokens really do split characters
    stream = TextStream(enc)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == CHINESE and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a token holding part of a character printed nothing yet
    broken = TextStream(enc)  # a character that never completes ends as U+FFFD, as Encoding.decode has it
    assert broken.push(ids[0]) == "" and broken.flush() == enc.decode(ids[:1]) == "\ufffd"


def test_cli_streams_each_complete_character_as_it_comes(run, monkeypatch):
    """The CLI's printing path, fed the tokens of Chinese text, writes whole characters as soon as they complete."""
    import torch

    ids = get_tokenizer("gpt2").encode_ordinary(CHINESE)
    monkeypatch.setattr(sample_cli, "stream_tokens", lambda **kw: (torch.tensor([[i]]) for i in ids))
    writes = []
    monkeypatch.setattr(
        sys, "stdout", type("Out", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})()
    )
    sample_cli.main(["--checkpoint", str(run["dir"]), "--prompt", "西游记"])
    assert "".join(writes) == "西游记" + CHINESE + "\n"
    assert writes[1:4] == ["", "话", ""] and not any("\ufffd" in w for w in writes)


def test_greedy_cli_output_is_the_notebook_api_output(run):
    model = analysis.load_model(run["dir"])
    expected = analysis.generate(model, "Every effort moves you", max_new_tokens=12)
    result = cli(
        "sample",
        "--checkpoint",
        run["dir"],
        "--prompt",
        "Every effort moves you",
        "--max_new_tokens",
        12,
        "--temperature",
        0,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected + "\n"
    piped = cli(
        "generate",  # the command's name in earlier releases: the same command, with a notice
        "--checkpoint",
        run["dir"] / "checkpoints" / "checkpoint_000004",
        "--max_new_tokens",
        12,
        "--temperature",
        0,
        stdin="Every effort moves you\n",
    )  # the prompt from stdin; echo's newline dropped
    assert piped.stdout == expected + "\n"
    notice = "accel_gpt: note: python -m accel_gpt.generate is now python -m accel_gpt.sample (same options)\n"
    assert piped.stderr == notice


def test_the_names_of_earlier_releases_still_work_with_a_notice(run):
    """Scripts and notebooks of earlier releases keep working for one release, told in one line what to use."""
    import torch

    import accel_gpt
    import accel_gpt.generate  # the old command's module: importing it leaves the package's function in place

    model = analysis.load_model(run["dir"])
    expected = analysis.generate(model, "Every effort moves you", max_new_tokens=6)
    assert accel_gpt.generate is analysis.generate
    with pytest.warns(FutureWarning, match="accel_gpt.generate_text is now accel_gpt.generate"):
        assert accel_gpt.generate_text(model, "Every effort moves you", 6, get_tokenizer()) == expected
    from accel_gpt.model import generate as old_generate

    with pytest.warns(FutureWarning, match="accel_gpt.model.generate is now accel_gpt.model.generate_ids"):
        assert old_generate(model, torch.tensor([[1, 2]]), 3).shape == (1, 5)
    from accel_gpt.errors import run_command

    with pytest.warns(FutureWarning, match="accel_gpt.errors.run_command is now accel_gpt.cli.run_command"):
        run_command(lambda: None)
    with pytest.warns(FutureWarning, match="accel_gpt.analysis.corpus_tokens is now accel_gpt.inference"):
        tokens = analysis.corpus_tokens("the-verdict", data_cache_dir=run["cache"])
    assert (
        len(tokens) == 5146 and tokens.read(0, 4).tolist() == get_tokenizer().encode_ordinary(VERDICT.read_text())[:4]
    )
    from accel_gpt.analysis import train
    from accel_gpt.train import train as new_train

    assert train.__wrapped__ is new_train  # a call says where it went
    with pytest.raises(AttributeError):
        accel_gpt.no_such_name  # noqa: B018


def test_the_data_modules_of_earlier_releases_are_the_data_packages_with_a_notice():
    """accel_gpt.corpus, .tokens, .stream, .rundata and the names of accel_gpt.data and accel_gpt.cache moved into
    the data package (accel_gpt/data/): the old imports give the new objects, each said in one line."""
    code = """
import warnings
warnings.simplefilter("always")
import accel_gpt.corpus, accel_gpt.tokens, accel_gpt.stream, accel_gpt.rundata
import accel_gpt.data.run_data, accel_gpt.data.sources, accel_gpt.data.streaming, accel_gpt.data.tokens
from accel_gpt.corpus import resolve_files
from accel_gpt.data import GlobalBatchSampler, eval_bytes_per_token
from accel_gpt.tokens import CHUNK_TOKENS
from accel_gpt.cache import DEFAULT_DIR, file_digest
from accel_gpt.data import cache, windows
assert accel_gpt.corpus is accel_gpt.data.sources and accel_gpt.tokens is accel_gpt.data.tokens
assert accel_gpt.stream is accel_gpt.data.streaming and accel_gpt.rundata is accel_gpt.data.run_data
assert GlobalBatchSampler is windows.GlobalBatchSampler and file_digest is cache.file_digest
assert eval_bytes_per_token is windows.eval_bytes_per_token
assert CHUNK_TOKENS == accel_gpt.data.tokens.RECORD_BATCH_TOKENS
print(resolve_files("the-verdict")[0].name, DEFAULT_DIR == cache.DEFAULT_DIR)
"""
    result = run_python(code)
    assert result.stdout.split() == ["the-verdict.txt", "True"]
    notices = [line.split("FutureWarning: ")[1] for line in result.stderr.splitlines() if "FutureWarning" in line]
    moved = [("corpus", "data.sources"), ("tokens", "data.tokens"), ("stream", "data.streaming")]
    moved += [("rundata", "data.run_data"), ("data.GlobalBatchSampler", "data.windows.GlobalBatchSampler")]
    moved += [("data.eval_bytes_per_token", "data.windows.eval_bytes_per_token")]
    moved += [("data.tokens.CHUNK_TOKENS", "data.tokens.RECORD_BATCH_TOKENS")]
    moved += [("cache.file_digest", "data.cache.file_digest")]
    assert notices == [
        f"accel_gpt.{old} is now accel_gpt.{new}; the old name goes in a later release" for old, new in moved
    ]
    with pytest.raises(AttributeError):
        import accel_gpt.data

        accel_gpt.data.no_such_name  # noqa: B018


def run_in_process(main, capsys, *args) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


def test_seeded_samples_repeat_and_differ_from_each_other(run, capsys):
    args = [
        "--checkpoint",
        run["dir"],
        "--prompt",
        "话说",
        "--max_new_tokens",
        15,
        "--top_k",
        50,
        "--top_p",
        0.9,
        "--temperature",
        1.0,
        "--seed",
        5,
        "--num_samples",
        2,
        "--step",
        2,
    ]
    first = run_in_process(sample_cli.main, capsys, *args)
    assert first == run_in_process(sample_cli.main, capsys, *args)
    samples = first.split("\n---\n")
    assert len(samples) == 2 and samples[0] != samples[1] and all(s.startswith("话说") for s in samples)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--top_p", "1.5"], "top_p must be in (0, 1] or None, got 1.5"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--max_new_tokens", "0"], "max_new_tokens and num_samples must be positive"),
        (["--top_k", "many"], "argument --top_k: invalid int value: 'many'"),
        (["--step", "3"], "checkpoint 3 not found"),
        (["--device", "nonsense"], "unknown device 'nonsense'"),
    ],
)
def test_generate_bad_options(run, args, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        sample_cli.main(["--checkpoint", str(run["dir"]), "--prompt", "x", *args])


def test_generate_errors_are_one_line_through_the_cli(run, tmp_path, capfd):
    assert_one_line_error(cli("sample", "--checkpoint", tmp_path / "nope", "--prompt", "x"), "nope does not exist")
    sampled = in_process(sample_cli.main, ["--checkpoint", run["dir"], "--top_p", "0"], capfd)
    assert_one_line_error(sampled, "top_p must be in (0, 1]")
    a_file = in_process(sample_cli.main, ["--checkpoint", run["dir"] / "metrics.jsonl", "--prompt", "x"], capfd)
    assert_one_line_error(a_file, "metrics.jsonl is a file: pass a run directory or a checkpoint directory")


@pytest.mark.parametrize(
    "option, fragment",
    [({"top_k": 0}, "top_k must be a positive integer"), ({"top_p": 0.0}, "top_p must be in (0, 1]"),
     ({"temperature": -1}, "temperature must be a finite number >= 0"),
     ({"max_new_tokens": -5}, "max_new_tokens must be an integer >= 0")],
)  # fmt: skip
def test_the_notebook_generate_checks_its_options_as_the_command_does(run, option, fragment):
    model = analysis.load_model(run["dir"])
    with pytest.raises(UserError, match=re.escape(fragment)):
        analysis.generate(model, "Every effort", **option)


def test_a_closed_pipe_and_ctrl_c_end_sampling_quietly(run):
    command = [sys.executable, "-m", "accel_gpt.sample", "--checkpoint", str(run["dir"]), "--prompt", "Every",
               "--max_new_tokens", "200", "--num_samples", "500", "--seed", "1"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert len(head.stdout.read(50)) == 50
    head.stdout.close()  # what `| head -c 50` does
    assert head.wait(timeout=120) == 141 and head.stderr.read() == b""
    interrupted = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    interrupted.stdout.read(50)
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130 and stderr.decode() == "accel_gpt: interrupted\n"


def evaluate(run, capsys, *args) -> dict:
    out = run_in_process(evaluate_main, capsys, "--checkpoint", run["dir"], "--data_cache_dir", run["cache"], *args)
    assert len(out.splitlines()) == 1
    return json.loads(out)


def test_evaluate_prints_the_notebook_perplexity(run, tmp_path, capsys):
    model = analysis.load_model(run["dir"])
    (tmp_path / "corpus").mkdir()
    part = tmp_path / "corpus" / "part.txt"
    part.write_text(VERDICT.read_text()[:1500])
    result = cli("evaluate", "--checkpoint", run["dir"], "--data", part, "--data_cache_dir", run["cache"])
    assert result.returncode == 0, result.stderr[-2000:]
    scored = json.loads(result.stdout)  # one JSON line; windows every half context, perplexity's default too
    assert (scored["stride"], scored["context_len"]) == (32, 64)
    expected = analysis.perplexity(model, part, data_cache_dir=run["cache"])
    assert scored["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert scored["perplexity"] == pytest.approx(math.exp(scored["loss"]), rel=1e-12)
    strided = evaluate(run, capsys, "--data", part, "--stride", 16, "--batch_size", 3)
    assert strided["perplexity"] == pytest.approx(
        analysis.perplexity(model, str(part), stride=16, batch_size=1, data_cache_dir=run["cache"]), rel=1e-6
    )
    assert strided["tokens"] == scored["tokens"] and strided["loss"] != pytest.approx(scored["loss"], rel=1e-4)
    for spec in (tmp_path / "corpus", tmp_path / "corpus" / "*.txt"):  # the other data path forms
        assert evaluate(run, capsys, "--data", spec, "--stride", 16)["loss"] == pytest.approx(strided["loss"], rel=1e-6)
    bundled = evaluate(run, capsys, "--data", "the-verdict", "--stride", 64)
    assert bundled["tokens"] == 5145  # 5,145 tokens and the end-of-text after the document: 5,145 targets
    assert bundled["perplexity"] == pytest.approx(
        analysis.perplexity(model, VERDICT, stride=64, data_cache_dir=run["cache"]), rel=1e-6
    )


def test_evaluate_scores_one_split_of_a_folder_laid_out_in_splits_and_says_which(run, tmp_path, capsys):
    """Scoring every file of a hub layout would score the training split too (issue 25: 299,154 tokens where the
    validation split had 5,064)."""
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    text = VERDICT.read_text()
    parts = {"train": text[:9000], "validation": text[9000:11000], "test": text[11000:14000]}
    for split, part in parts.items():
        (data / f"{split}-00000-of-00001.txt").write_text(part)
    model = analysis.load_model(run["dir"])
    scored = {}
    for split in parts:
        args = ["--split", split] if split != "validation" else []  # validation unless told
        scored[split] = evaluate(run, capsys, "--data", tmp_path / "hub", *args)
        assert scored[split]["split"] == split and scored[split]["files"] == 1
        alone = analysis.perplexity(model, data / f"{split}-00000-of-00001.txt", data_cache_dir=run["cache"])
        assert scored[split]["perplexity"] == pytest.approx(alone, rel=1e-6)
    assert scored["validation"]["tokens"] == len(get_tokenizer().encode_ordinary(parts["validation"]))  # + EOT - 1
    main = ["--checkpoint", run["dir"], "--data_cache_dir", run["cache"], "--data"]
    evaluate_main([*map(str, main), str(tmp_path / "hub")])
    note = capsys.readouterr().err
    scoring = "scoring its 1 validation file (1 test file, 1 train file not scored)"
    assert note == f"evaluate: {tmp_path / 'hub'} is laid out in splits: {scoring}\n"
    evaluate_main([*map(str, main), str(VERDICT)])
    assert capsys.readouterr().err == f"evaluate: scoring {VERDICT}\n"
    with pytest.raises(UserError, match="has no dev split: pass --split"):
        evaluate_main([*map(str, main), str(tmp_path / "hub"), "--split", "dev"])
    with pytest.raises(UserError, match="is not laid out in splits"):
        evaluate_main([*map(str, main), str(VERDICT), "--split", "test"])


@pytest.mark.parametrize("stride", [65, 256, 0, -3])
def test_stride_outside_one_to_context_is_rejected(run, stride):
    """A stride longer than the window skipped tokens yet counted them (issue 12: 13.0 where 24,706 was right)."""
    model = analysis.load_model(run["dir"])
    message = f"stride must be between 1 and the model's context_len 64, got {stride}"
    with pytest.raises(UserError, match=message):
        analysis.perplexity(model, "Some text to score. " * 20, stride=stride)
    with pytest.raises(UserError, match=message):
        evaluate_main(
            [
                "--checkpoint",
                str(run["dir"]),
                "--data",
                str(VERDICT),
                "--stride",
                str(stride),
                "--data_cache_dir",
                str(run["cache"]),
            ]
        )


def test_evaluate_errors_are_one_line_through_the_cli(run, tmp_path, capfd):
    assert_one_line_error(
        cli("evaluate", "--checkpoint", run["dir"], "--data", tmp_path / "none.txt"), "data path not found"
    )
    argv = ["--checkpoint", run["dir"], "--data", VERDICT, "--stride", 256, "--data_cache_dir", run["cache"]]
    assert_one_line_error(
        in_process(evaluate_main, argv, capfd), "stride must be between 1 and the model's context_len"
    )


def test_light_commands_import_no_training_code():
    """sample, evaluate, export and cache load checkpoints and data without Accelerate or the training loop."""
    code = (
        "import sys\n"
        "import accel_gpt.sample, accel_gpt.evaluate, accel_gpt.export, accel_gpt.cache, accel_gpt.analysis\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('accelerate', 'pandas', 'matplotlib')\n"
        "               or m in ('accel_gpt.train', 'accel_gpt.launch', 'accel_gpt.rundir', 'accel_gpt.metrics'))\n"
        "print('HEAVY', heavy)\n"
    )
    assert "HEAVY []" in run_python(code).stdout


def test_the_cache_command_runs_without_warnings(tmp_path):
    (tmp_path / "cache").mkdir()
    result = run_module("cache", "--data_cache_dir", tmp_path / "cache", "list")
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no runpy RuntimeWarning
