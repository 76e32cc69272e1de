"""The notebook API on a real (tiny) run: metrics, plots, checkpoints, generation, perplexity, train()."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, VERDICT, common_args, free_port, one_thread, run_python
from safetensors.torch import load_file

from accel_gpt import analysis
from accel_gpt.config import parse_config
from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel, generate_ids
from accel_gpt.tokenizer import get_tokenizer
from accel_gpt.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with checkpoints at 3 and 6, then resumed from 3: steps 4-6 are logged twice. Without biases
    (nanoGPT's default), so that option's path through training, resume and loading is covered too."""
    root = tmp_path_factory.mktemp("analysis")
    args = common_args(root / "run", root / "cache") + [
        "--max_steps",
        "6",
        "--save_freq",
        "3",
        "--eval_freq",
        "3",
        "--bias",
        "false",
    ]
    for extra in ([], ["--checkpoint", "3"]):  # in this process, as a notebook trains
        train(parse_config(one_thread(args + extra)))
    return root / "run"


@pytest.mark.slow
def test_load_run_has_one_row_per_step_and_every_metric(run_dir):
    run = analysis.load_run(run_dir)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 9  # 6 + 3 replayed after the resume
    assert run.metrics["step"].tolist() == [1, 2, 3, 4, 5, 6]
    for column in ("epoch", "tokens_seen", "lr", "loss", "train_loss", "val_loss", "tokens_per_sec"):
        assert column in run.metrics
    assert run.metrics["val_loss"].notna().sum() == 2  # evaluations at 3 and 6
    assert [p.name for p in run.checkpoints] == ["checkpoint_000003", "checkpoint_000006"]
    assert run.config["model"] == "tiny" and run.config["global_batch_size"] == 8
    with pytest.raises(UserError, match="not a run directory"):
        analysis.load_run(run_dir / "checkpoints")


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_plots_return_figures_and_write_pngs(run_dir, tmp_path):
    run = analysis.load_run(run_dir)
    fig = analysis.plot_losses(run, path=tmp_path / "losses.png")
    assert fig.axes and _is_png(tmp_path / "losses.png")
    analysis.plot_losses(run, x="tokens_seen", path=tmp_path / "tokens.png")
    analysis.plot_losses([run, run], labels=["a", "b"], path=tmp_path / "compare.png")
    analysis.plot_lr(run, path=tmp_path / "lr.png")
    assert all(_is_png(tmp_path / f) for f in ("tokens.png", "compare.png", "lr.png"))
    with pytest.raises(UserError, match="x must be"):
        analysis.plot_losses(run, x="time")


@pytest.mark.slow
def test_load_model_from_a_run_or_a_checkpoint(run_dir):
    newest = analysis.load_model(run_dir)
    assert not newest.training and next(newest.parameters()).device.type == "cpu"
    assert newest.config.bias is False and not any(n.endswith("bias") for n, _ in newest.named_parameters())
    saved = load_file(str(run_dir / "checkpoints" / "checkpoint_000006" / "model.safetensors"))
    assert torch.equal(newest.tok_emb.weight, saved["tok_emb.weight"])
    earlier = analysis.load_model(run_dir, step=3)
    assert not torch.equal(earlier.tok_emb.weight, newest.tok_emb.weight)
    direct = analysis.load_model(run_dir / "checkpoints" / "checkpoint_000003")
    assert torch.equal(direct.tok_emb.weight, earlier.tok_emb.weight)
    with pytest.raises(UserError, match="checkpoint 4 not found"):
        analysis.load_model(run_dir, step=4)


@pytest.mark.slow
def test_generate_greedy_and_seeded_sampling(run_dir):
    model = analysis.load_model(run_dir)
    greedy = analysis.generate(model, "Every effort moves you", max_new_tokens=8)
    enc = get_tokenizer("gpt2")
    prompt = enc.encode("Every effort moves you")
    assert greedy == enc.decode(generate_ids(model, torch.tensor([prompt]), 8)[0].tolist())
    a = analysis.generate(model, "Every effort", 8, temperature=1.0, top_k=40, seed=3)
    b = analysis.generate(model, "Every effort", 8, temperature=1.0, top_k=40, seed=3)
    assert a == b and a.startswith("Every effort")


@pytest.mark.slow
def test_perplexity_scores_every_token_once(run_dir, tmp_path):
    model = analysis.load_model(run_dir)
    ids = torch.tensor(get_tokenizer("gpt2").encode_ordinary(VERDICT.read_text()[:1200]))
    short = ids[:50]
    expected = math.exp(F.cross_entropy(model(short[None, :-1])[0], short[1:]).item())
    assert analysis.perplexity(model, get_tokenizer("gpt2").decode(short.tolist())) == pytest.approx(expected, rel=1e-5)
    # Long text, stride 16 with a 64-token context: each target scored once, with >= 48 tokens of context.
    losses, scored, start = [], 0, 0
    with torch.no_grad():
        while scored < len(ids) - 1:
            end = min(start + 65, len(ids))
            token_losses = F.cross_entropy(model(ids[None, start : end - 1])[0], ids[start + 1 : end], reduction="none")
            losses += token_losses[scored - start :].tolist()
            scored, start = end - 1, start + 16
    assert len(losses) == len(ids) - 1
    got = analysis.perplexity(model, get_tokenizer("gpt2").decode(ids.tolist()), stride=16)
    assert got == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert analysis.perplexity(model, str(VERDICT), data_cache_dir=tmp_path) > 1.0  # a file path works too


@pytest.mark.slow
def test_train_is_callable_from_python_and_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """The notebook way: Path objects for paths; afterwards SIGTERM ends the process and Ctrl-C raises
    KeyboardInterrupt, as before train() was called."""
    code = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from accel_gpt.train import train\n"
        "from accel_gpt.config import TrainConfig\n"
        "before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}\n"
        f"summary = train(TrainConfig(model='tiny', train_data_path=Path({str(VERDICT)!r}),"
        f" output_dir=Path({str(tmp_path / 'r')!r}), data_cache_dir=Path({str(tmp_path / 'c')!r}),"
        " max_steps=3, warmup_steps=1, eval_freq=3, batch_size=4, cpu_threads=1, peak_flops=1e11))\n"
        "print('STEP', summary['step'], 'VAL', summary['val_loss'])\n"
        "assert {s: signal.getsignal(s) for s in before} == before\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "print('RESTORED', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('SURVIVED SIGTERM')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    assert "STEP 3 VAL" in result.stdout and "RESTORED" in result.stdout and "SURVIVED" not in result.stdout
    assert [p.name for p in analysis.load_run(tmp_path / "r").checkpoints] == ["checkpoint_000003"]


@pytest.mark.slow
def test_notebook_launcher_trains_with_two_processes(tmp_path):
    """The documented way to train on several processes from a notebook."""
    code = (
        "from accelerate import notebook_launcher\n"
        "from accel_gpt.train import train\n"
        "from accel_gpt.config import TrainConfig\n"
        f"cfg = TrainConfig(model='tiny', train_data_path={str(VERDICT)!r}, output_dir={str(tmp_path / 'r')!r},"
        f" data_cache_dir={str(tmp_path / 'c')!r}, max_steps=3, warmup_steps=1, eval_freq=3, batch_size=2,"
        " cpu_threads=1, peak_flops=1e11)\n"
        f"notebook_launcher(train, (cfg,), num_processes=2, use_port={str(free_port())!r})\n"
    )
    result = run_python(code)
    assert "world_size 2" in result.stdout and "global batch 4 = 2 x 1 accumulation x 2 processes" in result.stdout
    assert analysis.load_run(tmp_path / "r").metrics["step"].tolist() == [1, 2, 3]


def write_metrics(run_dir, steps, **extra):
    """A metrics.jsonl as the trainer writes it: one record per logged step, in the order logged."""
    run_dir.mkdir(exist_ok=True)
    records = [
        {"step": s, "epoch": 0, "tokens_seen": 256 * s, "lr": 1e-3, "loss": 11.0 - s / 10, **extra} for s in steps
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_plots_of_a_run_without_evaluations(tmp_path):
    """eval_freq 0, or a run read before its first evaluation: no train_loss/val_loss columns at all."""
    run = analysis.load_run(write_metrics(tmp_path / "r", [1, 2, 3]))
    for x in ("step", "tokens_seen"):
        assert analysis.plot_losses(run, x=x, path=tmp_path / f"{x}.png").axes
    assert analysis.plot_losses([run, run], labels=["a", "b"]).axes


def test_a_resume_from_an_earlier_checkpoint_drops_the_abandoned_steps(tmp_path):
    """Steps 1-6 logged, then a resume from checkpoint 3 with a lower learning rate stopped at step 4: steps 5 and
    6 belong to the abandoned branch (whose checkpoints were moved aside), not to this run."""
    run_dir = write_metrics(tmp_path / "r", range(1, 7))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "epoch": 0, "tokens_seen": 1024, "lr": 1e-5, "loss": 9.0}) + "\n")
    metrics = analysis.load_run(run_dir).metrics
    assert metrics["step"].tolist() == [1, 2, 3, 4] and metrics["lr"].iloc[-1] == 1e-5


def test_samples_of_an_abandoned_attempt_are_dropped_as_its_metrics_are(tmp_path):
    """Samples at 2, 4, 6 (a torn 6), then a resume from step 2 that sampled at 4 and stopped at 5: samples.jsonl
    shows the resumed run's 4, not the abandoned 4 or 6."""
    run_dir = write_metrics(tmp_path / "r", range(1, 7))
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in (3, 4, 5):
            f.write(json.dumps({"step": step, "epoch": 0, "tokens_seen": 256 * step, "lr": 1e-5, "loss": 9.0}) + "\n")
    samples = [{"step": 2, "text": "first"}, {"step": 4, "text": "abandoned"}, {"step": 6, "text": "abandoned"}]
    lines = [json.dumps(sample) for sample in samples] + ['{"step": 6, "te', json.dumps({"step": 4, "text": "resumed"})]
    (run_dir / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="samples.jsonl line 4 is not a whole record"):
        run = analysis.load_run(run_dir)
    assert run.samples.to_dict("records") == [{"step": 2, "text": "first"}, {"step": 4, "text": "resumed"}]
    (run_dir / "samples.jsonl").write_text("\n".join(lines[:3]) + "\n")  # no sample of the resumed run yet:
    assert analysis.load_run(run_dir).samples["step"].tolist() == [2, 4]  # 6 lies past its last step, 5


def test_plotting_a_run_with_no_logged_step_yet_is_one_clear_error(tmp_path):
    """The trainer creates metrics.jsonl at start and logs the first steps later (every 10 on a GPU)."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    run = analysis.load_run(tmp_path / "r")
    assert run.metrics.empty
    for plot in (analysis.plot_losses, analysis.plot_lr):
        with pytest.raises(UserError, match=f"run {run.name} has no logged steps yet"):
            plot(run)


def test_generate_from_an_empty_prompt_starts_a_new_document():
    """As `python -m accel_gpt.sample --prompt ''` does: the continuation of an end-of-text token, without it."""
    torch.manual_seed(0)
    model = GPTModel(vocabulary_size=50257, context_len=16, embedding_dim=32, num_heads=2, num_layers=1, dropout=0.0)
    enc = get_tokenizer("gpt2")
    expected = enc.decode(generate_ids(model, torch.tensor([[enc.eot_token]]), 5)[0, 1:].tolist())
    assert analysis.generate(model, "", max_new_tokens=5) == expected != ""


@pytest.mark.slow
def test_load_model_from_the_folder_that_holds_the_checkpoints(run_dir):
    """What --checkpoint_dir names (often outside the run directory) is a natural thing to pass; it was searched
    for a checkpoints/ folder of its own, and the error named a <checkpoint_dir>/checkpoints that nobody made."""
    newest = analysis.load_model(run_dir)
    from_folder = analysis.load_model(run_dir / "checkpoints")
    assert torch.equal(from_folder.tok_emb.weight, newest.tok_emb.weight)
    earlier = analysis.load_model(run_dir / "checkpoints", step=3)
    assert torch.equal(earlier.tok_emb.weight, analysis.load_model(run_dir, step=3).tok_emb.weight)


def test_a_line_torn_by_a_kill_loses_only_itself(tmp_path):
    """A run killed while writing a record leaves a torn last line: its resume starts a new line (its first
    record is not glued onto the torn one), and load_run skips the torn line with a warning."""
    from accel_gpt.metrics import RunLogger

    record = dict(epoch=1, lr=1e-3, loss=5.0, tokens_per_sec=100.0)
    whole = [json.dumps(dict(record, step=s)) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(whole) + '\n{"step": 3, "epoch": 1, "lr": 0.0', encoding="utf-8")
    logger = RunLogger(tmp_path, True, total_steps=4, initial_step=2)
    for step in (3, 4):
        logger.log_step(dict(record, step=step, loss=4.0))
    logger.close()
    with pytest.warns(UserWarning, match="metrics.jsonl line 3 is not a whole record"):
        run = analysis.load_run(tmp_path)
    assert run.metrics["step"].tolist() == [1, 2, 3, 4]
    assert run.metrics["loss"].tolist() == [5.0, 5.0, 4.0, 4.0]
