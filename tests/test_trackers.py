"""Experiment trackers through Accelerate: TensorBoard from a real 2-process run (and its resume), W&B offline,
and one clear line for a tracker that is unknown or not installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assert_one_line_error, common_args, launch, one_thread, read_metrics

pytestmark = pytest.mark.slow  # every test here starts processes or trains


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar series in a TensorBoard log directory, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_metric_of_a_two_process_run_and_its_resume(tmp_path, train_here):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = common_args(out, tmp_path / "cache") + [
        "--batch_size",
        "2",
        "--max_steps",
        "6",
        "--save_freq",
        "3",
        "--eval_freq",
        "3",
        "--report_to",
        "tensorboard",
    ]
    launch(args, num_processes=2)
    first = scalars(out / "trackers" / "accel_gpt")
    # Resume from step 3 with another learning rate: steps 4-6 are logged again, with other losses, into the
    # same log directory; TensorBoard must show the resumed run's values, not the abandoned ones. On one process
    # (the same global batch), in this one: the 2-process run has shown that only the main process writes.
    resumed = train_here(*args, "--checkpoint", "3", "--learning_rate", "5e-3", "--batch_size", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = read_metrics(out)  # the latest record of each step
    logged = scalars(out / "trackers" / "accel_gpt")
    assert sorted(logged["loss"]) == list(range(1, 7))
    for step, record in metrics.items():
        for key in ("loss", "lr", "grad_norm", "tokens_seen", "epoch") + (
            ("train_loss", "val_loss") if step % 3 == 0 else ()
        ):
            assert logged[key][step] == pytest.approx(record[key], rel=1e-6), (key, step)
    assert first["loss"][5] != pytest.approx(logged["loss"][5], rel=1e-3)  # the replaced values really differed
    # Written by the main process only: one event file per launch, in one directory.
    assert len(list((out / "trackers" / "accel_gpt").glob("events.out.tfevents.*"))) == 2
    # The resolved config as hyper-parameters, once per launch (Accelerate also keeps them as hparams.yml).
    hparams = [yaml.safe_load(p.read_text()) for p in (out / "trackers" / "accel_gpt").glob("*/hparams.yml")]
    assert sorted(h["learning_rate"] for h in hparams) == [1.5e-3, 5e-3]
    assert all(h["report_to"] == "tensorboard" and h["global_batch_size"] == 4 for h in hparams)


def wandb_records(path: Path):
    """The records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks, each
    record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes either form


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    args = common_args(out, tmp_path / "cache") + [
        "--max_steps",
        "4",
        "--report_to",
        "wandb",
        "--run_name",
        "first try",
        "--project_name",
        "xiyouji-tests",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "accel_gpt.train", *one_thread(args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, run = {}, {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            values = {item_key(item): json.loads(item.value_json) for item in record.history.item}
            history[values["_step"]] = values
        elif kind == "config":
            config |= {item_key(item): json.loads(item.value_json) for item in record.config.update}
        elif kind == "run":
            run = record.run
    assert run.display_name == "first try" and run.project == "xiyouji-tests"
    metrics = read_metrics(out)
    assert sorted(history) == sorted(metrics) == [1, 2, 3, 4]
    for step, record in metrics.items():
        assert {k: history[step][k] for k in record if k != "step"} == {k: v for k, v in record.items() if k != "step"}
    assert config["learning_rate"] == 1.5e-3 and config["model"] == "tiny"


def test_unknown_and_uninstalled_trackers_stop_before_training(tmp_path, train_here):
    """In this process: the train command's one-line-error contract in a process of its own is tested elsewhere."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    args = common_args(tmp_path / "run", tmp_path / "cache")
    result = train_here(*args, "--report_to", "tensorbored")
    assert_one_line_error(
        result, "unknown tracker 'tensorbored' in report_to; choose none, all, or from", "tensorboard"
    )
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - {t.value for t in get_available_trackers()})
    if missing:
        assert_one_line_error(
            train_here(*args, "--report_to", f"tensorboard,{missing[0]}"),
            f"tracker '{missing[0]}' is not installed here (pip install",
        )
    assert not (tmp_path / "run").exists()  # no run directory, no checkpoint: nothing started
