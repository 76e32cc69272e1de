"""Weighted mixtures: windows drawn by weight (in the tokens trained on, and in what `accel_gpt.batches` shows), each
source validated on its own, the same losses at 1 and 2 processes and after a SIGKILL resume, one-line errors."""

import json
import shutil
from importlib import resources

import numpy as np
import pytest
from conftest import (
    RECIPE,
    VERDICT,
    assert_one_line_error,
    kill_all,
    launch,
    one_thread,
    read_metrics,
    start,
    steps_logged,
    wait_for,
)

from accel_gpt.batches import main as batches_main
from accel_gpt.config import TrainConfig, parse_config, validate
from accel_gpt.data.mixture import MixtureSampler, windows_drawn
from accel_gpt.errors import UserError
from accel_gpt.evaluate import main as evaluate_main
from accel_gpt.tokenizer import get_tokenizer

SHAKESPEARE = resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt"


@pytest.fixture
def mixture(tmp_path):
    """A 3:1 mixture of The Verdict and the start of Tiny Shakespeare, as the short form names it, and the options
    of a short run on it: 8 windows a step, so 6 of The Verdict and 2 of Shakespeare; The Verdict's 80 training
    windows run out within 14 steps."""
    plays = tmp_path / "plays.txt"
    plays.write_text(SHAKESPEARE.read_text()[:40_000])
    args = ["--model", "tiny", "--train_data_path", f"verdict={VERDICT}:3,plays={plays}:1",
            "--data_cache_dir", tmp_path / "cache", "--context_len", "32", "--batch_size", "4",
            "--global_batch_size", "8", "--max_steps", "16", "--warmup_steps", "2", "--eval_freq", "8",
            "--eval_iter", "1", "--save_freq", "4", "--val_fraction", "0.5", "--dropout", "0.0", "--seed", "5",
            "--learning_rate", "2e-3", "--peak_flops", "1e11"]  # fmt: skip
    return [str(a) for a in args], {"verdict": VERDICT, "plays": plays}


def test_a_mixture_trains_on_its_sources_by_weight_and_validates_each(mixture, tmp_path, train_here):
    args, _ = mixture
    result = train_here(*args, "--output_dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 sources (verdict 75%, plays 25%)" in result.stdout
    # The Verdict runs out first and carries on in a new order, said once.
    assert "source verdict: its 80 windows all drawn, epoch 2 of them begins at step 14" in result.stdout
    records = read_metrics(tmp_path / "run")
    last = records[16]
    verdict, plays = last["tokens_seen/verdict"], last["tokens_seen/plays"]
    assert verdict + plays == last["tokens_seen"] and verdict / plays == pytest.approx(3.0, rel=0.05)
    for step in (8, 16):  # each source's validation, and their mean by weight as the run's
        record = records[step]
        assert {"val_loss/verdict", "val_loss/plays", "val_bpb/verdict", "val_bpb/plays", "train_loss"} <= set(record)
        assert record["val_loss"] == pytest.approx(0.75 * record["val_loss/verdict"] + 0.25 * record["val_loss/plays"])
    assert records[16]["val_loss/plays"] < records[8]["val_loss/plays"] < records[1]["loss"]
    assert "val_loss/verdict" in result.stdout.splitlines()[-3]  # the console line of the last evaluation


def test_batches_show_each_windows_source_in_the_mixtures_ratio(mixture, capfd):
    args, paths = mixture
    batches_main(one_thread([*args, "--steps", "4", "--json"]))
    windows = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    names = [w["source"] for w in windows]
    assert len(windows) == 32 and names.count("verdict") == 24 and names.count("plays") == 8
    tokenizer = get_tokenizer()
    corpora = {name: " " + " ".join(map(str, tokenizer.encode_ordinary(path.read_text()))) + " " for name, path in
               paths.items()}  # fmt: skip
    for window in windows:  # a slice of the source it names
        assert " " + " ".join(map(str, window["tokens"])) + " " in corpora[window["source"]]


def test_windows_drawn_keep_to_the_weights_at_every_step_and_never_give_one_back():
    weights = (0.5, 0.3, 0.19, 0.01)
    steps = np.arange(3000)
    drawn = windows_drawn(steps, 4, weights)
    assert (np.diff(drawn, axis=0) >= 0).all() and (drawn.sum(axis=1) == steps * 4).all()
    assert np.abs(drawn - steps[:, None] * 4 * np.array(weights)).max() < 2
    sampler = MixtureSampler([7, 50, 30, 5], weights, 2, 4, seed=3, num_steps=3000)
    resumed = MixtureSampler([7, 50, 30, 5], weights, 2, 4, seed=3, num_steps=3000)
    resumed.set_position(0, 1234)  # a resume computes its position from the step alone
    assert list(resumed)[:20] == list(sampler)[1234 * 2 : 1234 * 2 + 20]
    seen = sampler.step_windows(0).tolist() + sampler.step_windows(1).tolist()
    assert all(0 <= i < 92 for i in seen)


@pytest.mark.slow  # two launches of two processes
def test_a_mixture_gives_one_process_losses_at_two_processes_and_after_a_sigkill(
    mixture, tmp_path, train_here, trained_tokenizer
):
    """With a trained tokenizer, and under Muon with every model option: 2 gloo processes train with them as one
    does (each rank orthogonalises the same all-reduced momentum, so every rank applies one process's update)."""
    args, _ = mixture
    args = [*args, "--tokenizer", str(trained_tokenizer), *RECIPE]
    reference = train_here(*args, "--output_dir", tmp_path / "one")
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "two"
    command = [*args, "--output_dir", str(out), "--checkpoint", "auto"]
    proc = start(command, num_processes=2)
    caught = wait_for(lambda: steps_logged(out) >= 6, proc)  # past the checkpoint of step 4
    kill_all(proc)
    stdout, stderr = proc.communicate()
    assert caught, f"never reached step 6\n{stdout[-1500:]}\n{stderr[-3000:]}"
    assert "resumed at step" in launch(command, num_processes=2).stdout
    one, two = read_metrics(tmp_path / "one"), read_metrics(out)
    assert sorted(one) == sorted(two) == list(range(1, 17))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-5), step
        assert two[step]["tokens_seen/plays"] == one[step]["tokens_seen/plays"]
    assert two[16]["val_loss/plays"] == pytest.approx(one[16]["val_loss/plays"], abs=1e-5)


def test_a_streamed_mixture_draws_by_weight_and_resumes_exactly(mixture, tmp_path, train_here, capfd):
    """Streaming: a stream per source on each process, each step's windows drawn from them by weight; a checkpoint
    holds every source's stream, so a resume continues each."""
    args, _ = mixture
    args = [*args, "--streaming", "true", "--stream_workers", "0", "--max_steps", "8", "--shuffle_buffer", "16"]
    whole = train_here(*args, "--output_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = read_metrics(tmp_path / "whole")
    assert first[8]["tokens_seen/verdict"] == 3 * first[8]["tokens_seen/plays"]
    assert {"val_loss/verdict", "val_loss/plays", "val_bpb/plays"} <= set(first[8])
    shutil.copytree(tmp_path / "whole", tmp_path / "again")
    resumed = train_here(*args, "--output_dir", tmp_path / "again", "--checkpoint", "4")
    assert resumed.returncode == 0 and "resumed at step 4" in resumed.stdout
    again = read_metrics(tmp_path / "again")
    assert [again[s]["loss"] for s in range(5, 9)] == [first[s]["loss"] for s in range(5, 9)]
    batches_main(one_thread([*args, "--steps", "2", "--json"]))
    names = [json.loads(line)["source"] for line in capfd.readouterr().out.splitlines()]
    assert names.count("verdict") == 12 and names.count("plays") == 4


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a.txt:3,b.txt:x", "train_data_path: source b's weight must be a positive number, got 'x'"),
        ("a.txt:3,b.txt:-1", "source b's weight must be a positive number, got '-1'"),
        ("a.txt:3,b.txt:inf", "source b's weight must be a positive number"),
        ("b=b.txt:nan", "source b's weight must be a positive number, got 'nan'"),
        ("a.txt:1e308,b.txt:1e308", "the weights add up to more than a number holds; they are relative"),
        ("b.txt:-Inf", "source b's weight must be a positive number, got '-Inf'"),
        ("a=x.txt:1,a=y.txt:2", "two sources are named a: give each its own name"),
        ("x/a.txt:1,y/a.txt:2", "two sources are named a"),
        ("a.txt:1,b.txt", "'b.txt' has no weight; a mixture is [NAME=]PATH:WEIGHT,..."),
        ("[{path: a.txt, weight: 1}, {path: b.txt, wieght: 2}]", "source b has unknown key 'wieght'"),
        ("[{path: a.txt, dataset: b}]", "source b needs a path or a dataset (one of them)"),
        ("[a.txt]", "source 1 must be a mapping (path or dataset, weight, name)"),
        ("[]", "an empty list names no data"),
    ],
)
def test_a_bad_mixture_is_one_line_naming_the_source(value, message):
    with pytest.raises(UserError) as caught:
        parse_config(["--train_data_path", value, "--max_steps", "5"])
    assert message in str(caught.value)


def test_a_mixture_takes_the_config_files_list_and_refuses_what_it_cannot_combine_with(tmp_path, train_here):
    config = tmp_path / "mix.yaml"
    config.write_text("train_data_path:\n  - {path: the-verdict, weight: 3}\n  - {path: tinyshakespeare, name: s}\n"
                      "max_steps: 5\n")  # fmt: skip
    cfg = parse_config(["--config", str(config)])
    assert cfg.train_data_path == [
        {"name": "the-verdict", "weight": 3.0, "path": "the-verdict"},
        {"name": "s", "path": "tinyshakespeare"},
    ]
    assert validate(TrainConfig(train_data_path=cfg.train_data_path, max_steps=5)) == validate(cfg)
    mixture = "a=the-verdict:3,b=tinyshakespeare:1"
    assert_one_line_error(train_here("--train_data_path", mixture), "a mixture's sources run out at different steps")
    for extra, message in [
        (["--dataset", "some/dataset"], "dataset and a mixture in train_data_path"),
        (["--val_data_path", str(VERDICT)], "each source of a mixture is validated on its own: give a source's"),
    ]:
        assert_one_line_error(train_here("--train_data_path", mixture, "--max_steps", "5", *extra), message)


def test_evaluate_refuses_a_mixture_in_one_line(capfd):
    from conftest import in_process

    result = in_process(evaluate_main, ["--checkpoint", "nowhere", "--data", "a.txt:3,b.txt:1"], capfd)
    assert_one_line_error(result, "--data a.txt:3,b.txt:1 is a mixture: evaluate scores one corpus")
