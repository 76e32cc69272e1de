import hashlib
import json
import re
import shutil
from importlib import resources

import pytest
from conftest import VERDICT, assert_one_line_error, in_process, read_metrics

from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer

SHAKESPEARE = resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt"


def test_gpt2_ids_match_tiktoken_reference():
    enc = get_tokenizer("gpt2")
    assert enc.n_vocab == 50257
    assert enc.encode("Hello, world!") == [15496, 11, 995, 0]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # special tokens only when asked for


def test_chinese_and_raw_bytes_round_trip():
    enc = get_tokenizer("gpt2")
    text = "萧炎，斗之力，三段"
    assert len(enc.encode(text)) == 20
    assert enc.decode(enc.encode(text)) == text
    assert all(isinstance(enc.encode_single_token(bytes([b])), int) for b in range(256))  # every byte is a token


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(UserError, match="unknown tokenizer"):
        get_tokenizer("no-such-encoding")


# ----------------------------------------------------------------------------------------------- trained tokenizers
TEXTS = [
    "孙悟空大闹天宫，唐僧师徒四人西天取经。",
    "emoji 🙂🎉👩‍👩‍👧 and mixed scripts: Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "control characters \x00\x01\x1f\x7f, tabs\tand\r\nnewlines\n\n   and   spaces  ",
    "numbers 1234567890 3.14159 and code: def f(x): return x**2  # done",
    "é" * 7 + "\u0301\u200b\ufeff",
]


@pytest.fixture
def trained(trained_tokenizer):
    return trained_tokenizer


def test_a_trained_tokenizer_round_trips_any_utf8_and_gives_hugging_faces_ids(trained):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = get_tokenizer(str(trained))
    assert ours.n_vocab == 600 and ours.eot_token == 599  # the end-of-text after the merges, as GPT-2's
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["vocab_size"] == 600 and manifest["pattern"] == "gpt2"
    assert manifest["sha256"] == hashlib.sha256((trained / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["trained_on"]["characters"] > 40_000
    theirs, auto = Tokenizer.from_file(str(trained / "tokenizer.json")), AutoTokenizer.from_pretrained(trained)
    for text in [*TEXTS, VERDICT.read_text(), SHAKESPEARE.read_text()[:50_000]]:
        ids = ours.encode_ordinary(text)
        assert ours.decode(ids) == text  # lossless, whatever the script
        assert ids == theirs.encode(text, add_special_tokens=False).ids == auto.encode(text, add_special_tokens=False)


def test_the_gpt4_split_pattern_trains_too_and_says_its_compression(tmp_path, capsys):
    from accel_gpt.tokenizer.__main__ import main

    main(["train", "--data", str(VERDICT), "--vocab_size", "400", "--out", str(tmp_path / "t"), "--pattern", "gpt4",
          "--max_chars", "15000"])  # fmt: skip
    out = capsys.readouterr().out
    assert "trained a byte-level BPE of 400 ids (pattern gpt4) on" in out
    assert "held-out text (" in out and "tokens per character" in out and "(GPT-2: " in out
    tokenizer = get_tokenizer(str(tmp_path / "t"))
    assert all(tokenizer.decode(tokenizer.encode_ordinary(t)) == t for t in TEXTS)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["trained_on"]["characters"] <= 15000


def test_a_tokenizer_trains_on_a_dataset_streamed_through_datasets(tmp_path, capsys):
    from accel_gpt.tokenizer.__main__ import main

    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    lines = [json.dumps({"content": t}) for t in TEXTS * 20]
    (folder / "train-00000.jsonl").write_text("\n".join(lines) + "\n")
    main(["train", "--dataset", str(tmp_path / "hub"), "--text_column", "content", "--vocab_size", "300", "--out",
          str(tmp_path / "t")])  # fmt: skip
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["trained_on"]["dataset"] == str(tmp_path / "hub") and manifest["trained_on"]["documents"] == 100
    assert all(get_tokenizer(str(tmp_path / "t")).decode(get_tokenizer(str(tmp_path / "t")).encode_ordinary(t)) == t
               for t in TEXTS)  # fmt: skip


def test_a_tokenizer_folder_is_never_overwritten_unless_asked_and_then_moved_aside(trained, tmp_path, capfd):
    from accel_gpt.tokenizer.__main__ import main

    out = tmp_path / "bpe"
    shutil.copytree(trained, out)
    before = (out / "tokenizer.json").read_bytes()
    args = ["train", "--data", str(VERDICT), "--vocab_size", "300", "--out", str(out)]
    assert_one_line_error(in_process(main, args, capfd), f"--out {out} already holds a tokenizer")
    assert (out / "tokenizer.json").read_bytes() == before
    assert in_process(main, [*args, "--overwrite"], capfd).returncode == 0
    (aside,) = out.glob("overwritten-*")
    assert (aside / "tokenizer.json").read_bytes() == before and get_tokenizer(str(out)).n_vocab == 300


def set_normalizer(spec):
    spec["normalizer"] = {"type": "Lowercase"}


def set_prefix_space(spec):
    steps = spec["pre_tokenizer"].get("pretokenizers") or [spec["pre_tokenizer"]]
    steps[-1]["add_prefix_space"] = True


def set_template(spec):
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {}}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_normalizer, "normalizes text first (Lowercase)"),
        (set_prefix_space, "puts a space before every text (add_prefix_space)"),
        (set_template, "adds tokens to what it encodes (TemplateProcessing)"),
        (lambda spec: spec["model"].update(merges=[]), "has 0 merges for 343 tokens of several bytes"),
        (lambda spec: spec.update(model=None), "is not a valid tokenizer.json (AttributeError:"),
        (lambda spec: spec["added_tokens"][0].update(id=-5), "is not a valid tokenizer.json (OverflowError:"),
        (lambda spec: spec["model"]["vocab"].update(a="5"), "is not a valid tokenizer.json (TypeError:"),
    ],
)
def test_a_tokenizer_json_that_would_give_other_ids_than_hugging_face_is_one_line(trained, tmp_path, edit, message):
    """tiktoken would encode these otherwise than `tokenizers` and `transformers` do (or not at all): refused, not
    trained on with ids an exported tokenizer would not give."""
    spec = json.loads((trained / "tokenizer.json").read_text())
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=re.escape(message)):
        get_tokenizer(str(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab_size", "100"], "vocab_size must be in [258, 1048576], got 100"),
        (["--vocab_size", "300", "--max_chars", "0"], "max_chars must be positive, got 0"),
        (["--vocab_size", "300", "--out", ""], "--out is empty: give the folder to write the tokenizer to"),
        (["--vocab_size", "300", "--out", VERDICT / "t"], "is under " + str(VERDICT) + ", a file: give a folder"),
        (["--vocab_size", "300", "--data", f"a={VERDICT}:1,b={VERDICT}:1"], "is a mixture: a tokenizer trains on one"),
    ],
)
def test_bad_training_options_are_one_line(args, message, tmp_path, capfd, monkeypatch):
    from accel_gpt.tokenizer.__main__ import main

    monkeypatch.chdir(tmp_path)  # an empty --out is refused, not the working directory written to
    args = ["train", "--data", str(VERDICT), "--out", str(tmp_path / "t"), *map(str, args)]  # the last --out wins
    assert_one_line_error(in_process(main, args, capfd), message)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_no_byte_level_bpe_is_one_line(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        get_tokenizer(str(tmp_path))
    word_level = {"model": {"type": "WordLevel", "vocab": {"a": 0}}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(word_level))
    with pytest.raises(UserError, match="is a WordLevel model: accel_gpt reads byte-level BPE tokenizers"):
        get_tokenizer(str(tmp_path))


def test_training_with_a_trained_tokenizer_keeps_its_own_cache_entries_and_its_own_resume(
    trained, tmp_path, train_here
):
    from accel_gpt.data.cache import scan

    common = ["--model", "tiny", "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "cache",
              "--context_len", "32", "--batch_size", "4", "--max_steps", "4", "--warmup_steps", "1",
              "--eval_freq", "4", "--eval_iter", "1", "--save_freq", "4", "--peak_flops", "1e11"]  # fmt: skip
    ours = train_here(*common, "--tokenizer", trained, "--output_dir", tmp_path / "ours")
    assert ours.returncode == 0, ours.stderr[-3000:]
    record = read_metrics(tmp_path / "ours")[4]
    assert record["val_bpb"] > 0 and record["loss"] < 6.5  # ln(600) = 6.4: its own vocabulary, not GPT-2's
    assert train_here(*common, "--output_dir", tmp_path / "gpt2").returncode == 0
    assert len(scan(tmp_path / "cache")) == 2  # one corpus, two tokenizers: two entries, never mixed
    again = train_here(*common, "--max_steps", "6", "--output_dir", tmp_path / "ours", "--checkpoint", "latest")
    carrier = tmp_path / "ours" / "checkpoints" / "checkpoint_000004"
    assert_one_line_error(again, "with tokenizer gpt2: it was trained with tokenizer", str(trained), "sha256:",
                          f"(the checkpoint carries it: --tokenizer {carrier})")  # fmt: skip
    resumed = train_here(*common, "--max_steps", "6", "--output_dir", tmp_path / "ours", "--checkpoint", "latest",
                         "--tokenizer", carrier)  # fmt: skip
    assert resumed.returncode == 0 and "resumed at step 4" in resumed.stdout, resumed.stderr[-3000:]
    streamed = train_here(*common, "--tokenizer", trained, "--streaming", "true", "--stream_workers", "0",
                          "--output_dir", tmp_path / "streamed")  # fmt: skip
    assert streamed.returncode == 0 and read_metrics(tmp_path / "streamed")[4]["loss"] < 6.5
    branched = train_here(*common, "--init_from", tmp_path / "ours", "--output_dir", tmp_path / "new")
    assert_one_line_error(branched, "has a vocabulary of 600 tokens (tokenizer", "tokenizer gpt2 one of 50257")


def test_a_run_carries_its_tokenizer_into_sampling_evaluation_and_export(trained, tmp_path, train_here, capfd):
    """Every checkpoint holds the tokenizer's files (verified with the weights): the folder it was trained with can
    move or go, and sample, evaluate, the notebook API and export still use it unasked."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from accel_gpt import analysis
    from accel_gpt.evaluate import main as evaluate_main
    from accel_gpt.export import main as export_main
    from accel_gpt.sample import main as sample_main

    folder = shutil.copytree(trained, tmp_path / "bpe")
    args = ["--model", "tiny", "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "cache", "--tokenizer",
            folder, "--context_len", "32", "--batch_size", "4", "--max_steps", "3", "--warmup_steps", "1",
            "--eval_freq", "3", "--eval_iter", "1", "--peak_flops", "1e11",
            "--output_dir", tmp_path / "run"]  # fmt: skip
    assert train_here(*args).returncode == 0
    shutil.rmtree(folder)
    tokenizer = get_tokenizer(str(trained))
    model = analysis.load_model(tmp_path / "run")
    expected = analysis.generate(model, "I had always thought", 8, tokenizer=tokenizer)
    assert analysis.generate(model, "I had always thought", 8) == expected  # its own tokenizer, unasked
    sampled = in_process(sample_main, ["--checkpoint", tmp_path / "run", "--prompt", "I had always thought",
                                       "--max_new_tokens", "8", "--temperature", "0"], capfd)  # fmt: skip
    assert sampled.returncode == 0 and sampled.stdout.strip() == expected
    scored = in_process(evaluate_main, ["--checkpoint", tmp_path / "run", "--data", VERDICT], capfd)
    bpb = json.loads(scored.stdout)["bpb"]
    assert bpb == pytest.approx(analysis.bits_per_byte(model, VERDICT, data_cache_dir=tmp_path / "c2"), rel=1e-6)
    assert in_process(export_main, ["--checkpoint", tmp_path / "run", "--out", tmp_path / "hf"], capfd).returncode == 0
    auto, hf_model = AutoTokenizer.from_pretrained(tmp_path / "hf"), GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    ids = tokenizer.encode_ordinary(TEXTS[0] + " " + TEXTS[1])
    assert auto.encode(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False) == ids
    with torch.no_grad():
        x = torch.tensor([ids[:32]])
        torch.testing.assert_close(hf_model(x).logits, model(x), atol=1e-4, rtol=0)
