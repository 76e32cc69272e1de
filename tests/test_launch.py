"""End-to-end: the real trainer through `accelerate launch`, on 1 CPU process and on 2 gloo processes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from subprocess import Popen

import pytest
import torch
from conftest import REPO, VERDICT, common_args, free_port, launch, launch_env, one_thread, read_metrics
from safetensors.torch import load_file

from accel_gpt.config import parse_config
from accel_gpt.tokenizer import get_tokenizer
from accel_gpt.train import train

pytestmark = pytest.mark.slow  # every test here starts processes or trains


def task_args(root) -> list[str]:
    """--eval_tasks of 17 examples each from The Verdict's lines: three groups of 8, which 2 processes share 2 + 1."""
    lines = [line for line in VERDICT.read_text().splitlines() if len(line.split()) > 6][:20]
    mc = [{"query": " ".join(line.split()[:4]), "choices": [" ".join(other.split()[4:8]) for other in lines[i : i + 3]],
           "gold": 0} for i, line in enumerate(lines[:17])]  # fmt: skip
    completion = [
        {"context": " ".join(line.split()[:-1]), "continuation": " " + line.split()[-1]} for line in lines[:17]
    ]
    for name, rows in (("mc", mc), ("completion", completion)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["--eval_tasks", f"{root / 'mc.jsonl'},{root / 'completion.jsonl'}"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    out = root / "run2"
    result = launch(common_args(out, root / "cache") + ["--batch_size", "2", *task_args(root)], num_processes=2)
    final_weights = load_file(str(out / "checkpoints" / "checkpoint_000010" / "model.safetensors"))
    return {
        "out": out,
        "cache": root / "cache",
        "stdout": result.stdout,
        "metrics": read_metrics(out),
        "root": root,
        "final_weights": final_weights,
    }


@pytest.fixture(scope="module")
def one_process_run(two_process_run):
    """The same run on one process, batch 4 instead of 2 x 2: the same global batch. In this process: the launcher
    is under test in the 2-process runs, and a process start costs more than this run."""
    out = two_process_run["root"] / "run1"
    args = common_args(out, two_process_run["cache"]) + ["--batch_size", "4", *task_args(two_process_run["root"])]
    train(parse_config(one_thread(args)))
    return out


def test_two_gloo_processes_train_and_write_a_plain_checkpoint(two_process_run):
    out, metrics = two_process_run["out"], two_process_run["metrics"]
    assert "world_size 2 | DDP (gloo) |" in two_process_run["stdout"]
    assert two_process_run["stdout"].count("accel_gpt | world_size") == 1  # only the main process logs
    assert sorted(metrics) == list(range(1, 11))
    losses = [metrics[s]["loss"] for s in range(1, 11)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # loss clearly falls
    assert metrics[10]["val_loss"] < metrics[5]["val_loss"]
    for key in ("epoch", "tokens_seen", "lr", "tokens_per_sec"):
        assert key in metrics[1]
    assert metrics[10]["tokens_seen"] == 10 * 4 * 64
    assert [metrics[s]["epoch"] for s in (8, 9, 10)] == [0, 1, 1]
    ckpt = out / "checkpoints" / "checkpoint_000010"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 10
    weights = load_file(str(ckpt / "model.safetensors"))  # safetensors alone, no accel_gpt, no pickle
    assert "tok_emb.weight" in weights and not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    assert (out / "samples.jsonl").read_text().strip()
    # Each rank has its own random stream (dropout masks): with one shared seed they would be equal.
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert not torch.equal(rng["rank0.torch"], rng["rank1.torch"])
    assert (out / "config.yaml").exists()


def test_one_process_equals_two_processes_at_the_same_global_batch(two_process_run, one_process_run):
    out1 = one_process_run
    one, two = read_metrics(out1), two_process_run["metrics"]
    for step in range(1, 11):
        assert one[step]["loss"] == pytest.approx(two[step]["loss"], abs=1e-5), step
    assert one[10]["val_loss"] == pytest.approx(two[10]["val_loss"], abs=1e-5)
    # --eval_tasks: the examples shared out to the ranks, the counts summed: the numbers of one process.
    for step in (5, 10):
        assert one[step]["mc/acc"] == two[step]["mc/acc"] and one[step]["mc/acc_norm"] == two[step]["mc/acc_norm"]
        assert one[step]["completion/acc"] == two[step]["completion/acc"]
        assert one[step]["completion/perplexity"] == pytest.approx(two[step]["completion/perplexity"], rel=1e-4)
    w1 = load_file(str(out1 / "checkpoints" / "checkpoint_000010" / "model.safetensors"))
    w2 = two_process_run["final_weights"]
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=0)


def test_two_process_checkpoint_resumes_on_one_process(two_process_run, tmp_path, train_here):
    one = tmp_path / "one"
    shutil.copytree(two_process_run["out"], one)
    (one / "metrics.jsonl").unlink()
    resumed = train_here(*common_args(one, two_process_run["cache"]), "--batch_size", "4", "--checkpoint", "5")
    assert "resumed at step 5" in resumed.stdout and "saved by 2 processes" in resumed.stdout
    metrics, two = read_metrics(one), two_process_run["metrics"]
    assert sorted(metrics) == [6, 7, 8, 9, 10]
    for step in metrics:  # the same global batches, so the same losses (dropout 0)
        assert metrics[step]["loss"] == pytest.approx(two[step]["loss"], abs=1e-5), step
    final = load_file(str(one / "checkpoints" / "checkpoint_000010" / "model.safetensors"))
    for name, tensor in two_process_run["final_weights"].items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=0)


def test_gradient_accumulation_derived_from_global_batch_matches(two_process_run, train_here):
    out = two_process_run["root"] / "run_accum"
    result = train_here(*common_args(out, two_process_run["cache"]), "--batch_size", "2", "--global_batch_size", "4")
    assert "global batch 4 = 2 x 2 accumulation x 1 processes" in result.stdout
    accumulated, two = read_metrics(out), two_process_run["metrics"]
    for step in range(1, 11):
        assert accumulated[step]["loss"] == pytest.approx(two[step]["loss"], abs=1e-5), step
    # Evaluation reads the same windows at any world size: the first eval_iter global batches.
    for step in (5, 10):
        for key in ("train_loss", "val_loss"):
            assert accumulated[step][key] == pytest.approx(two[step][key], abs=1e-5), (step, key)


def test_python_m_with_a_separate_validation_path(tmp_path, train_here):
    """The train command needs no launcher (one process; `python -m` itself, in a process of its own, is
    test_faults' SIGINT case); val_data_path takes a directory of .jsonl files."""
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    text = VERDICT.read_text(encoding="utf-8")
    (val_dir / "part.jsonl").write_text(json.dumps({"text": text[:6000]}) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    args = common_args(out, tmp_path / "cache") + ["--val_data_path", str(val_dir), "--max_steps", "3"]
    result = train_here(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size 1 | one process |" in result.stdout
    val_tokens = len(get_tokenizer("gpt2").encode(text[:6000])) + 1  # + end-of-text
    assert f"/ {(val_tokens - 65) // 64 + 1} val windows" in result.stdout
    assert read_metrics(out)[3]["val_loss"] > 0


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    """The Verdict as 4 files, a shard each, and the run of one machine on them."""
    root = tmp_path_factory.mktemp("four-shards")
    corpus = root / "corpus"
    corpus.mkdir()
    paragraphs = VERDICT.read_text().split("\n\n")
    for part in range(4):
        (corpus / f"part{part}.txt").write_text("\n\n".join(paragraphs[part::4]))
    args = [*common_args(root / "one", root / "cache"), "--train_data_path", corpus, "--batch_size", "2"]
    args += ["--cache_shard_mb", "0.000001"]  # one file per shard
    # One machine, in this process: 1 process x batch 4 trains as 2 x 2 (test_one_process_equals_two_processes...)
    train(parse_config(one_thread([*args, "--batch_size", "4"])))
    return {"args": args, "metrics": read_metrics(root / "one"), "corpus": corpus}


def two_machines(args_of_machine) -> list[tuple[int, str, str]]:
    """Two `accelerate launch` commands as machine 1 and 2 (one process each) over 127.0.0.1: (exit code, stdout,
    stderr) of each."""
    port = free_port()
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "accel_gpt.train", *one_thread(args_of_machine(machine_rank)),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=launch_env(),
                cwd=REPO,
                start_new_session=True,
            )
        )
    try:
        return [(p.returncode, *out) for p, out in ((p, p.communicate(timeout=300)) for p in procs)]
    except subprocess.TimeoutExpired:
        for proc in procs:  # the whole group: the trainer the launcher started holds the pipes too
            os.killpg(proc.pid, signal.SIGKILL)
        outputs = enumerate(map(Popen.communicate, procs))
        pytest.fail(
            "two machines ran past 300 s\n"
            + "\n".join(f"machine {m}:\n{o[-2000:]}\n{e[-3000:]}" for m, (o, e) in outputs)
        )


@pytest.mark.parametrize("cache", ["shared", "one per machine"])
def test_two_machines_share_the_tokenizing_out_and_train_as_one_machine(four_shards, tmp_path, cache):
    """The multi-node path. Each machine tokenizes 2 of the 4 shards, none is tokenized twice where the cache is
    shared, a machine with a cache of its own then tokenizes the 2 it cannot see, and the losses equal one
    machine's."""

    def args(machine_rank: int) -> list:
        cache_dir = tmp_path / ("cache" if cache == "shared" else f"cache{machine_rank}")
        return [*four_shards["args"], "--output_dir", tmp_path / "run", "--data_cache_dir", cache_dir]  # later wins

    outputs = two_machines(args)
    for code, _, stderr in outputs:
        assert code == 0, stderr[-3000:]
    assert "world_size 2" in outputs[0][1] and "accel_gpt | world_size" not in outputs[1][1]  # machine 2 logs no run
    for machine, (_, stdout, _) in enumerate(outputs, 1):
        lines = [line for line in stdout.splitlines() if line.startswith("tokenized train data: 2 of 4 shards")]
        assert len(lines) == (1 if cache == "shared" else 2) and f"(machine {machine} of 2)" in lines[0], stdout
    for cache_dir in {tmp_path / ("cache" if cache == "shared" else f"cache{m}") for m in (0, 1)}:
        metas = list(cache_dir.glob("tokens-*/meta.json"))
        builders = {json.loads(meta.read_text())["built_by"]["pid"] for meta in metas}
        assert len(metas) == 4 and len(builders) == (2 if cache == "shared" else 1)
    two = read_metrics(tmp_path / "run")
    for step in range(1, 11):
        assert two[step]["loss"] == pytest.approx(four_shards["metrics"][step]["loss"], abs=1e-5), step


def test_two_machines_with_different_files_stop_with_one_line(four_shards, tmp_path):
    corpus = four_shards["corpus"]
    other = shutil.copytree(corpus, tmp_path / "other")
    (other / "part4.txt").write_text("One more file than the other machine has.")
    run = [*four_shards["args"], "--output_dir", tmp_path / "run", "--data_cache_dir", tmp_path / "cache"]
    outputs = two_machines(lambda rank: [*run, "--train_data_path", other if rank else corpus])
    for code, _, stderr in outputs:
        assert code != 0 and "accel_gpt: error: the data differs between machines: process 0 sees 4 shards" in stderr
        assert "[rank" not in stderr  # no traceback of ours, only the launcher's report
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_on_two_cpu_processes_matches_ddp_and_writes_one_consolidated_checkpoint(
    two_process_run, one_process_run, train_here
):
    """FSDP2 over gloo (accelerate_configs/cpu_2proc_fsdp.yaml): sharded training, unsharded files, which resume
    on one process, and a 1-process checkpoint resumed onto 2 sharded processes.

    Micro-batches of 1 with 2 accumulation steps: the same global batch of 4 as the DDP run it is compared to."""
    out, cache = two_process_run["root"] / "run_fsdp", two_process_run["cache"]
    args = common_args(out, cache) + ["--batch_size", "1", "--global_batch_size", "4"]
    result = launch([*args, *task_args(two_process_run["root"])], num_processes=2, config="cpu_2proc_fsdp.yaml")
    header = next(line for line in result.stdout.splitlines() if line.startswith("accel_gpt |"))
    assert "world_size 2 | FSDP (gloo) |" in header and "held per process" in header
    assert "1 x 2 accumulation x 2 processes" in header
    fsdp, ddp = read_metrics(out), two_process_run["metrics"]
    for step in range(1, 11):
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], abs=1e-5), step
    for metric in ("mc/acc", "mc/acc_norm", "completion/acc"):  # tasks scored on sharded parameters
        assert fsdp[10][metric] == ddp[10][metric], metric
    assert fsdp[10]["completion/perplexity"] == pytest.approx(ddp[10]["completion/perplexity"], rel=1e-4)
    ckpt = out / "checkpoints" / "checkpoint_000010"
    weights = load_file(str(ckpt / "model.safetensors"))  # one file, full shapes, written by the main process
    assert sorted(p.name for p in ckpt.iterdir() if "safetensors" in p.name) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
    ]
    for name, tensor in two_process_run["final_weights"].items():
        # Reduce-scatter sums in another order than all-reduce; Adam turns that into rare 1e-5 differences.
        torch.testing.assert_close(weights[name], tensor, atol=1e-4, rtol=0)
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert moments["tok_emb.weight.exp_avg"].shape == weights["tok_emb.weight"].shape

    # FSDP's step-5 checkpoint resumed unsharded on one process: the same losses.
    one = two_process_run["root"] / "run_fsdp_on_one"
    shutil.copytree(out / "checkpoints" / "checkpoint_000005", one / "checkpoints" / "checkpoint_000005")
    assert train_here(*common_args(one, cache), "--batch_size", "4", "--checkpoint", "5").returncode == 0

    # A 1-process checkpoint resumed sharded onto 2 processes: the run goes on at step 6, each rank is reseeded
    # from (seed, rank, step), so the ranks' dropout streams differ again, and with dropout 0 the losses are the
    # 1-process run's. (2 processes resumed by 2, their dropout streams restored: test_streaming.py's SIGKILL.)
    more = two_process_run["root"] / "run_fsdp_from_one"
    shutil.copytree(one_process_run, more)
    resumed = launch([*common_args(more, cache), "--batch_size", "1", "--global_batch_size", "4", "--checkpoint",
                      "5"], num_processes=2, config="cpu_2proc_fsdp.yaml")  # fmt: skip
    assert "resumed at step 5" in resumed.stdout and "(saved by 1 processes: dropout RNG reseeded)" in resumed.stdout
    assert "step      6/10" in resumed.stdout and "step      5/10" not in resumed.stdout
    rng = load_file(str(more / "checkpoints" / "checkpoint_000010" / "rng.safetensors"))
    assert not torch.equal(rng["rank0.torch"], rng["rank1.torch"])
    for run in (read_metrics(one), read_metrics(more)):
        for step in range(6, 11):
            assert run[step]["loss"] == pytest.approx(ddp[step]["loss"], abs=1e-5), step


def test_fsdp_with_bf16_trains_and_logs_fp32_losses(two_process_run):
    """FSDP2's bf16 mixed precision casts parameters, without autocast: the chunked loss once crashed on them, and
    Accelerate's policy rounded the loss the model returns in fp32 to bf16 (its root module's output, whichever
    loss path made it). The plain loss path on bf16 parameters is tested in process (tests/test_model.py)."""
    out = two_process_run["root"] / "run_fsdp_bf16"
    # Steps 1-3 depend only on the warmup, not on the run's length: comparable with the 10-step fp32 run.
    args = common_args(out, two_process_run["cache"]) + ["--batch_size", "2", "--max_steps", "3", "--loss_chunk", "64"]
    result = launch(args, 2, config="cpu_2proc_fsdp.yaml", launcher_args=("--mixed_precision", "bf16"))
    assert "world_size 2 | FSDP (gloo) | device cpu:0 | mixed_precision bf16 |" in result.stdout
    bf16, fp32 = read_metrics(out), two_process_run["metrics"]
    losses = [bf16[step]["loss"] for step in (1, 2, 3)]
    assert losses == pytest.approx([fp32[step]["loss"] for step in (1, 2, 3)], abs=0.01)
    assert math.isfinite(bf16[3]["val_loss"])
    # A bf16 number has 8 significant bits and the mean of two ranks' one more: had the loss been rounded to
    # bf16, every logged loss would fit in 9 bits. An fp32 loss does so by chance once in 2**15.
    assert all(math.frexp(loss)[0] * 2**9 % 1 for loss in losses), losses
