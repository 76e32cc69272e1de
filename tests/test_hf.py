"""Hugging Face interop: export to GPT2LMHeadModel and pretraining from a local HF GPT-2 folder."""

import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, VERDICT, assert_one_line_error, common_args, copy_run, in_process, read_metrics
from safetensors.torch import load_file

from accel_gpt.checkpoint import full_state_dicts, save_checkpoint
from accel_gpt.config import TrainConfig, parse_config
from accel_gpt.errors import UserError
from accel_gpt.hf import to_hf_state_dict
from accel_gpt.inference import load_model
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer
from accel_gpt.plan import plan_run
from accel_gpt.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")
SIZES = dict(vocabulary_size=50257, context_len=32, embedding_dim=32, num_heads=2, num_layers=2, dropout=0.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "qkv_bias, bias, tie", [(False, True, False), (True, True, True), (False, True, True), (False, False, True)]
)
def test_exported_folder_loads_in_transformers_with_the_same_logits(tmp_path, capfd, qkv_bias, bias, tie):
    from accel_gpt.export import main

    torch.manual_seed(0)
    model = GPTModel(**SIZES, qkv_bias=qkv_bias, bias=bias, tie_weights=tie).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    ckpt = save_checkpoint(
        tmp_path / "ckpts", 7, model.config, full_state_dicts(model, build_optimizer(model, TrainConfig())), {}, {}
    )
    result = in_process(main, ["--checkpoint", ckpt, "--out", tmp_path / "hf"], capfd)  # a process of its own below
    assert result.returncode == 0, result.stderr[-2000:]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings is tie
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)


def test_the_exported_tokenizer_gives_accel_gpts_ids_offline(tiny_run, tmp_path, capfd):
    """export writes GPT-2's tokenizer beside the weights: AutoTokenizer loads it with no network and encodes every
    text, English, Chinese, emoji and runs of spaces, to the ids training used."""
    from accel_gpt.export import main

    assert in_process(main, ["--checkpoint", tiny_run.out, "--out", tmp_path / "hf"], capfd).returncode == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = get_tokenizer()
    assets = REPO / "accel_gpt" / "assets"
    texts = [VERDICT.read_text(), (assets / "xiyouji.txt").read_text(encoding="utf-8")[:5000],
             "Hello   world\n\n\t  🐒 café  it's you'll I'M  \r\n"]  # fmt: skip
    for text in texts:
        assert tokenizer(text)["input_ids"] == ours.encode_ordinary(text)
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode(ours.encode_ordinary(texts[2])) == texts[2]


def test_a_network_gpt2_cannot_hold_is_refused_naming_its_options(tmp_path, capfd):
    from accel_gpt.export import main

    model = GPTModel(**SIZES, position="rotary", activation="relu2", zero_init_projections=True)
    ckpt = save_checkpoint(
        tmp_path / "ckpts", 7, model.config, full_state_dicts(model, build_optimizer(model, TrainConfig())), {}, {}
    )
    result = in_process(main, ["--checkpoint", ckpt, "--out", tmp_path / "hf"], capfd)
    assert_one_line_error(result, "GPT-2 has no position rotary, activation relu2: this model cannot be exported")
    assert not (tmp_path / "hf").exists()  # zero-initialised projections are only a start: not named
    # A rotary model has no position table to outgrow: its context is what it was trained at.
    with pytest.raises(UserError, match=f"context_len 64 exceeds the context \\(rotary positions\\) of {ckpt} \\(32"):
        plan_run(parse_config(["--init_from", str(ckpt), "--context_len", "64"]), 1)


@pytest.mark.slow
def test_export_of_a_missing_checkpoint_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accel_gpt.export",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"accel_gpt: error: checkpoint path {tmp_path / 'nope'} does not exist" in result.stderr


@pytest.mark.slow
def test_pretraining_starts_from_a_local_hf_gpt2(tmp_path, train_here):
    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = tmp_path / "run"
    args = [
        "--init_from",
        tmp_path / "hf",
        "--train_data_path",
        VERDICT,
        "--data_cache_dir",
        tmp_path / "c",
        "--output_dir",
        out,
        "--context_len",
        "32",
        "--max_steps",
        "2",
        "--warmup_steps",
        "1",
        "--initial_lr",
        "0",
        "--save_freq",
        "1",
        "--dropout",
        "0",
        "--batch_size",
        "4",
    ]
    result = train_here(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "windows of 32 tokens" in result.stdout  # a window shorter than the 64-position table
    # Step 1 ran at lr 0: the checkpoint holds exactly the Hugging Face weights.
    ours = load_file(str(out / "checkpoints" / "checkpoint_000001" / "model.safetensors"))
    # init_from pads the vocabulary to the default multiple of 64 with zero rows, which stay zero.
    assert ours["tok_emb.weight"].shape == (50304, 32) and not ours["tok_emb.weight"][50257:].any()
    model = GPTModel(
        vocabulary_size=50257,
        context_len=64,
        embedding_dim=32,
        num_heads=2,
        num_layers=2,
        dropout=0.0,
        qkv_bias=True,
        tie_weights=True,
        vocab_multiple=64,
    )
    model.load_state_dict(ours | {"out_head.weight": ours["tok_emb.weight"]})
    expected = hf.state_dict()
    for name, tensor in to_hf_state_dict(model).items():
        assert torch.equal(tensor, expected[name]), name
    idx = torch.randint(0, 50257, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), hf(idx).logits, atol=1e-4, rtol=0)
    assert_one_line_error(
        train_here(*args, "--embedding_dim", "64"), "has embedding_dim 32, not 64", "so drop embedding_dim"
    )
    # In a new run directory: `out` now holds a run, which a new run would be refused before reaching these checks.
    fresh = ["--output_dir", tmp_path / "fresh"]
    assert_one_line_error(train_here(*args[2:], *fresh, "--init_from", tmp_path / "nowhere"), "no readable config.json")
    assert_one_line_error(
        train_here(*args, *fresh, "--context_len", "128"), "context_len 128 exceeds the position table"
    )


def test_init_from_our_checkpoint_takes_its_shape_and_is_never_moved_aside(tiny_run):
    base = ["--train_data_path", VERDICT, "--init_from", tiny_run.out]
    plan = plan_run(parse_config([*map(str, base), "--embedding_dim", "64", "--num_layers", "2"]), 1)  # its own
    assert plan.init_checkpoint == tiny_run.out / "checkpoints" / "checkpoint_000004"
    assert plan.model_name == f"from {tiny_run.out}"
    with pytest.raises(UserError, match="is in the run that overwrite moves aside"):
        plan_run(parse_config([*map(str, base), "--output_dir", str(tiny_run.out), "--overwrite", "true"]), 1)
    assert plan_run(parse_config([*map(str, base), "--model", "tiny"]), 1).model_config.embedding_dim == 64  # repeats
    # A preset with shape options, and a shorter context, that make the network's shape repeat it.
    repeats = ["--model", "mini", "--embedding_dim", "64", "--num_heads", "2", "--context_len", "32"]
    assert plan_run(parse_config([*map(str, base), *repeats]), 1).context_len == 32
    shape = "embedding_dim 64, not 128, num_heads 2, not 4"
    with pytest.raises(
        UserError, match=f"is not the mini preset \\({shape}\\): its network's shape is the run's, so drop"
    ):
        plan_run(parse_config([*map(str, base), "--model", "mini"]), 1)


def test_export_never_writes_into_a_checkpoint_or_a_run(tiny_run, tmp_path, capfd):
    from accel_gpt.export import main

    run = copy_run(tiny_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "checkpoint_000004"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    onto = in_process(main, ["--checkpoint", checkpoint, "--out", checkpoint], capfd)
    assert_one_line_error(onto, f"--out {checkpoint} is inside checkpoint {checkpoint}: export into a folder")
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    for out in (run, run / "checkpoints"):
        assert_one_line_error(in_process(main, ["--checkpoint", run, "--out", out], capfd), "holds a run or its")
    assert in_process(main, ["--checkpoint", run, "--out", run / "hf"], capfd).returncode == 0  # a folder of its own


def test_export_refuses_a_folder_holding_its_files_and_overwrite_moves_them_aside(tiny_run, tmp_path, capfd):
    from accel_gpt.export import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')  # a user's own file, which export would replace
    (out / "notes.md").write_text("kept")
    refused = in_process(main, ["--checkpoint", tiny_run.out, "--out", out], capfd)
    assert_one_line_error(
        refused, f"--out {out} already holds config.json: export into a new folder, or pass --overwrite"
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.md"]
    assert (out / "config.json").read_text() == '{"mine": true}'
    replaced = in_process(main, ["--checkpoint", tiny_run.out, "--out", out, "--overwrite"], capfd)
    assert replaced.returncode == 0, replaced.stderr
    (aside,) = out.glob("overwritten-*")  # moved, never deleted
    assert (aside / "config.json").read_text() == '{"mine": true}' and (out / "notes.md").read_text() == "kept"
    assert transformers.GPT2Config.from_pretrained(out).n_embd == 64
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for name in ("dataset_info.json", "state.json"):  # what datasets' save_to_disk writes
        (dataset / name).write_text("{}")
    saved = in_process(main, ["--checkpoint", tiny_run.out, "--out", dataset, "--overwrite"], capfd)
    assert_one_line_error(saved, "holds a dataset saved by `datasets`: export into a folder of its own")
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset_info.json", "state.json"]
    corpus = tmp_path / "hub" / "data"  # config.json there would join the corpus as a JSON file
    corpus.mkdir(parents=True)
    (corpus / "train-00000-of-00001.txt").write_text("text")
    for out in (corpus, corpus.parent):
        refused = in_process(main, ["--checkpoint", tiny_run.out, "--out", out], capfd)
        assert_one_line_error(refused, f"--out {out} holds corpus files ({corpus / 'train-00000-of-00001.txt'})")
    assert sorted(p.name for p in corpus.parent.rglob("*")) == ["data", "train-00000-of-00001.txt"]


@pytest.mark.slow
def test_a_new_run_starts_from_our_own_checkpoint_and_resumes_itself(tmp_path, train_here):
    """Continued pretraining: a run on The Verdict, then a new run on 西游记 from its checkpoint (its weights and
    shape; a fresh optimizer, schedule and data order), validated on The Verdict: it starts at the first run's
    loss there, not at a fresh model's."""
    first = [*common_args(tmp_path / "verdict", tmp_path / "cache"), "--learning_rate", "3e-3"]
    assert train_here(*first).returncode == 0
    # The first run's model on the windows that the second run's evaluation reads: The Verdict's first 8 of 65.
    model = load_model(tmp_path / "verdict")
    tokens = torch.tensor(get_tokenizer().encode_ordinary(VERDICT.read_text()))[: 7 * 64 + 65]
    windows = tokens.unfold(0, 65, 64)
    with torch.no_grad():
        verdict_loss = model(windows[:, :-1], windows[:, 1:]).item()
    second = [
        "--train_data_path", "xiyouji", "--val_data_path", VERDICT, "--data_cache_dir", tmp_path / "cache",
        "--max_steps", "4", "--warmup_steps", "1", "--learning_rate", "1e-5", "--min_lr", "1e-6", "--eval_freq", "1",
        "--eval_iter", "2",
        "--save_freq", "2", "--context_len", "64", "--batch_size", "4", "--sample_tokens", "2",
    ]  # fmt: skip
    continued = train_here(*second, "--init_from", tmp_path / "verdict", "--output_dir", tmp_path / "continued")
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert f"initialised from {tmp_path / 'verdict'}: its weights alone" in continued.stdout
    started = read_metrics(tmp_path / "continued")[1]["val_loss"]
    # A fresh model after one step of 1e-5 would score about ln(50257) = 10.8, uniform over the vocabulary.
    assert abs(started - verdict_loss) < 0.02 and started < math.log(50257) - 0.5
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "continued", resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint_000004")
    again = train_here(*second, "--init_from", tmp_path / "verdict", "--output_dir", resumed, "--checkpoint", "2")
    assert again.returncode == 0 and "resumed at step 2" in again.stdout
    for step in (3, 4):
        assert read_metrics(resumed)[step]["loss"] == read_metrics(tmp_path / "continued")[step]["loss"]
