"""Folders written by Hugging Face `datasets`' save_to_disk as data paths: the tokens of the same texts as .jsonl."""

import json
import shutil
import subprocess
import sys

import datasets
import pytest
from conftest import REPO, VERDICT, assert_only_line_error

from accel_gpt import analysis
from accel_gpt.data.sources import resolve_files
from accel_gpt.data.tokens import TokenStream, tokenize_corpus
from accel_gpt.errors import UserError
from accel_gpt.evaluate import main as evaluate_main

EOS = 50256
PARAGRAPHS = [p for p in VERDICT.read_text().split("\n\n") if p.strip()]  # ~5,200 tokens in 80-odd documents


def save_dataset(folder, texts, num_shards=1, **columns):
    datasets.Dataset.from_dict({"text": texts, **columns}).save_to_disk(str(folder), num_shards=num_shards)
    return folder


def as_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def tokens(stream: TokenStream) -> list[int]:
    return stream.read(0, len(stream)).tolist()


def cached_tokens(cache_dir, spec) -> list[int]:
    """The tokens a run wrote to its cache for the data path `spec`."""
    for meta in cache_dir.glob("tokens-*/meta.json"):
        if json.loads(meta.read_text())["files"] == [str(spec)]:
            return tokens(TokenStream([meta.parent / "tokens.arrow"]))
    raise AssertionError(f"no cache entry for {spec} in {cache_dir}")


@pytest.mark.slow
def test_training_and_evaluate_read_a_dataset_and_a_dataset_dict_split_as_jsonl(tmp_path, capfd, train_here):
    """Through the command lines: a Dataset folder (three shards) and a DatasetDict's split folder give the same ids,
    in the same order, as the same texts in a .jsonl file (end-of-text after every row)."""
    train_texts, val_texts = PARAGRAPHS[:60], PARAGRAPHS[60:]
    train = save_dataset(tmp_path / "train_ds", train_texts, num_shards=3, id=list(range(60)))
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": train_texts}),
        validation=datasets.Dataset.from_dict({"text": val_texts}),
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    cache, out = tmp_path / "cache", tmp_path / "run"
    result = train_here(
        "--model",
        "tiny",
        "--train_data_path",
        train,
        "--val_data_path",
        tmp_path / "dict" / "validation",
        "--data_cache_dir",
        cache,
        "--output_dir",
        out,
        "--max_steps",
        3,
        "--warmup_steps",
        1,
        "--eval_freq",
        3,
        "--eval_iter",
        1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for spec, texts in ((train, train_texts), (tmp_path / "dict" / "validation", val_texts)):
        expected = tokens(
            tokenize_corpus(
                str(as_jsonl(tmp_path / f"{spec.name}.jsonl", texts)), "gpt2", EOS, tmp_path / "jsonl_cache"
            )[0]
        )
        assert cached_tokens(cache, spec) == expected
        assert expected.count(EOS) == len(texts)

    # The evaluate command in process (its own process would add seconds of imports, not coverage).
    capfd.readouterr()
    evaluate_main(["--checkpoint", str(out), "--data", str(train), "--data_cache_dir", str(cache)])
    expected = analysis.perplexity(
        analysis.load_model(out), tmp_path / "train_ds.jsonl", data_cache_dir=cache
    )  # both at their default stride, half the context
    assert json.loads(capfd.readouterr().out)["perplexity"] == pytest.approx(expected, rel=1e-6)
    # A whole DatasetDict folder: one split is scored, validation unless --split names another.
    for split, texts in (("validation", val_texts), ("train", train_texts)):
        evaluate_main(["--checkpoint", str(out), "--data", str(tmp_path / "dict"), "--data_cache_dir", str(cache),
                       *(["--split", split] if split == "train" else [])])  # fmt: skip
        printed = capfd.readouterr()
        expected = analysis.perplexity(analysis.load_model(out), as_jsonl(tmp_path / f"{split}.jsonl", texts),
                                       data_cache_dir=cache)  # fmt: skip
        assert json.loads(printed.out)["perplexity"] == pytest.approx(expected, rel=1e-6)
        assert printed.err == f"evaluate: {tmp_path / 'dict'} is a saved DatasetDict: scoring its {split} split\n"


def test_the_cache_key_is_the_shards_content(tmp_path, cache_dir):
    first, hit = tokenize_corpus(
        str(save_dataset(tmp_path / "a", PARAGRAPHS[:5], num_shards=2)), "gpt2", EOS, cache_dir
    )
    assert not hit
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # moved or copied: still a hit
    again, hit = tokenize_corpus(str(tmp_path / "copy"), "gpt2", EOS, cache_dir)
    assert hit and tokens(again) == tokens(first)
    edited = save_dataset(tmp_path / "b", PARAGRAPHS[:4] + [PARAGRAPHS[4] + " Edited."], num_shards=2)
    shutil.rmtree(tmp_path / "copy")
    shutil.copytree(edited, tmp_path / "copy")  # the path that just hit, holding other rows: a miss
    changed, hit = tokenize_corpus(str(tmp_path / "copy"), "gpt2", EOS, cache_dir)
    assert not hit and tokens(changed) != tokens(first)


@pytest.mark.slow
def test_datasets_is_imported_only_to_read_a_dataset(tmp_path):
    """A .txt corpus, and a dataset whose tokens are cached, do not pay seconds for importing `datasets`."""
    folder = save_dataset(tmp_path / "ds", PARAGRAPHS[:3])
    tokenize_corpus(str(folder), "gpt2", EOS, tmp_path / "cache")
    code = (
        f"import sys\nfrom accel_gpt.data.tokens import tokenize_corpus\n"
        f"assert not tokenize_corpus({str(VERDICT)!r}, 'gpt2', {EOS}, {str(tmp_path / 'cache')!r})[1]\n"
        f"assert tokenize_corpus({str(folder)!r}, 'gpt2', {EOS}, {str(tmp_path / 'cache')!r})[1]\n"
        "print('datasets' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"


def test_a_dataset_dict_folder_names_its_splits_and_a_nested_dataset_is_not_searched(tmp_path, cache_dir):
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a"]}), test=datasets.Dataset.from_dict({"text": ["b"]})
    ).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(
        UserError,
        match=r"dict is a saved DatasetDict \(splits: test, train\): pass one split's "
        r"folder, e.g. .*dict/test$",
    ):
        resolve_files(str(tmp_path / "dict"))
    assert resolve_files(str(tmp_path / "dict" / "train")) == [tmp_path / "dict" / "train"]
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    (corpus / "a.txt").write_text("Some text.")
    save_dataset(corpus / "more" / "ds", ["Some more text."])  # its state.json is no JSON-lines file to read
    with pytest.raises(
        UserError,
        match=r"more/ds is a saved Hugging Face dataset inside .*corpus: pass it as a data "
        "path of its own",
    ):
        resolve_files(str(corpus))
    with pytest.raises(UserError, match=r"the 'text' column of .*numbers holds int64, not strings"):
        tokenize_corpus(str(save_dataset(tmp_path / "numbers", [1, 2])), "gpt2", EOS, cache_dir)


def test_a_dataset_without_text_or_with_nulls_is_one_line_through_the_cli(tmp_path, train_here):
    folder = tmp_path / "no_text"
    datasets.Dataset.from_dict({"body": ["x"], "id": [1]}).save_to_disk(str(folder))
    result = train_here("--train_data_path", folder, "--data_cache_dir", tmp_path / "c")
    expected = f"train data: {folder} has no 'text' column (columns: body, id; --text_column names another)"
    assert_only_line_error(result, expected)
    texts = ["fine"] * 300 + [None, "fine", None] + ["fine"] * 300 + [None]  # nulls in two batches of rows read at once
    folder = save_dataset(tmp_path / "nulls", texts)
    result = train_here("--train_data_path", VERDICT, "--val_data_path", folder, "--data_cache_dir", tmp_path / "c")
    expected = f"validation data: {folder}: 3 rows have no 'text' value (null), the first at row index 300"
    assert_only_line_error(result, expected)  # counted over the whole column
