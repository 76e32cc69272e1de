import json
import re
import signal

import pytest
from accelerate import Accelerator
from conftest import VERDICT

import accel_gpt.train as train_module
from accel_gpt.config import TrainConfig
from accel_gpt.errors import UserError
from accel_gpt.metrics import RunLogger
from accel_gpt.model import PRESETS, GPTModel
from accel_gpt.optim import build_optimizer
from accel_gpt.plan import batch_geometry
from accel_gpt.train import StopSignal, train


def test_weight_decay_only_on_matrices():
    model = GPTModel(**PRESETS["tiny"], qkv_bias=True)
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "trf_blocks.0.att.qkv.bias" in no_decay_names and "final_norm.weight" in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "batch, accumulation, global_batch, world, expected",
    [(8, 1, None, 1, (1, 8)), (4, 3, None, 2, (3, 24)), (4, 1, 32, 2, (4, 32)), (8, 1, 32, 4, (1, 32))],
)
def test_global_batch_is_batch_times_accumulation_times_world(batch, accumulation, global_batch, world, expected):
    cfg = TrainConfig(batch_size=batch, gradient_accumulation_steps=accumulation, global_batch_size=global_batch)
    assert batch_geometry(cfg, world) == expected


def test_global_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(
        UserError, match=r"global_batch_size 30 is not a multiple of batch_size x processes \(4 x 2 = 8\)"
    ):
        batch_geometry(TrainConfig(batch_size=4, global_batch_size=30), 2)


def tiny_config(tmp_path, name: str, **values) -> TrainConfig:
    """A few steps of the tiny model, trained in this process (as a notebook does): one thread, and a given peak for
    MFU, as conftest.common_args gives every other trainer the suite runs."""
    defaults = dict(
        model="tiny", train_data_path=VERDICT, data_cache_dir=tmp_path / "c", output_dir=tmp_path / name,
        max_steps=6, warmup_steps=1, eval_freq=0, save_freq=100, batch_size=4, cpu_threads=1, peak_flops=1e11,
    )  # fmt: skip
    return TrainConfig(**(defaults | values))


def test_log_every_keeps_one_exact_record_per_step(tmp_path):
    """Deferring the host sync to every 4th step changes no logged value, and eval_freq 0 never evaluates."""
    runs = {}
    for log_every in (1, 4):
        out = tmp_path / f"every{log_every}"
        train(tiny_config(tmp_path, out.name, log_every=log_every))
        runs[log_every] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert not (out / "samples.jsonl").read_text()
    assert [r["step"] for r in runs[4]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(runs[1], runs[4]):
        assert "val_loss" not in b
        assert (a["loss"], a["grad_norm"], a["lr"], a["tokens_seen"]) == (
            b["loss"],
            b["grad_norm"],
            b["lr"],
            b["tokens_seen"],
        )
    assert runs[4][0]["step_time"] == runs[4][3]["step_time"]  # one window: its steps share the mean time


def test_the_header_says_what_the_run_holds_needs_and_how_many_epochs(tmp_path, capfd):
    train(tiny_config(tmp_path, "run", max_steps=10))  # 18 steps an epoch: less than one
    header = next(line for line in capfd.readouterr().out.splitlines() if line.startswith("accel_gpt |"))
    assert "(6,536,704 params) |" in header and "held" not in header  # one process holds every parameter
    assert "| 10 steps (0.556 epochs of 18) |" in header
    assert re.search(r"\| memory ~\d+\.\d of \d+\.\d GiB free$", header), header


def test_a_loop_that_raises_restores_the_signal_handlers_and_closes_the_logger_and_trackers(tmp_path, monkeypatch):
    """After train() raises in a notebook, Ctrl-C and SIGTERM work as before it, and the run's files and
    trackers are closed."""
    before = {sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS}
    closed = []
    monkeypatch.setattr(RunLogger, "close", lambda self: closed.append("logger"))
    monkeypatch.setattr(Accelerator, "end_training", lambda self: closed.append("trackers"))

    def fail(*args):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]  # the loop's own handler is in
        raise RuntimeError("a failure inside the loop")

    monkeypatch.setattr(train_module, "count_nonfinite", fail)
    with pytest.raises(RuntimeError, match="a failure inside the loop"):
        train(tiny_config(tmp_path, "fails", max_steps=3))
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert closed == ["logger", "trackers"]
