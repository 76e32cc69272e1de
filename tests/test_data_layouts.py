"""Data paths as people hold corpora: folders laid out in hub splits, links and link cycles, another text column."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import VERDICT, assert_one_line_error

from accel_gpt.data.sources import hub_splits, resolve_data, resolve_files
from accel_gpt.data.tokens import tokenize_corpus
from accel_gpt.errors import UserError

EOS = 50256


def parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts}), path)
    return path


def hub_layout(root: Path) -> Path:
    """A snapshot of a hub dataset repository: sharded train, one validation and one test shard, a README."""
    words = VERDICT.read_text().split()
    part = len(words) // 5
    texts = [" ".join(words[i * part : (i + 1) * part]) for i in range(5)]
    parquet(root / "data" / "train-00000-of-00002.parquet", texts[0:1])
    parquet(root / "data" / "train-00001-of-00002.parquet", texts[1:2] + texts[2:3])
    parquet(root / "data" / "validation-00000-of-00001.parquet", texts[3:4])
    parquet(root / "data" / "test-00000-of-00001.parquet", texts[4:5])
    (root / "README.md").write_text("---\nlicense: public domain\n---\n")
    return root


def tokens(stream) -> list[int]:
    return stream.read(0, len(stream)).tolist()


def names(files) -> list[str]:
    return [Path(f).name for f in files]


def test_a_hub_layout_trains_on_train_validates_on_validation_and_says_so(tmp_path):
    root = hub_layout(tmp_path / "hub")
    files = resolve_data(str(root), None)
    assert names(files.train) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert names(files.validation) == ["validation-00000-of-00001.parquet"]
    assert files.note == (
        f"train data: {root} is laid out in splits: training on its 2 train files, validating on its 1 validation "
        "file (1 test file not used)"
    )
    # A validation path of its own wins; the layout's validation file is then left out, and said to be.
    other = parquet(tmp_path / "other.parquet", ["Some other text to validate on."])
    files = resolve_data(str(root / "data"), str(other))
    assert names(files.validation) == ["other.parquet"] and "(1 test file, 1 validation file not used)" in files.note
    # A glob is read the same way.
    assert names(resolve_data(str(root / "data" / "*.parquet"), None).train) == names(files.train)


@pytest.mark.slow  # imports datasets
def test_splits_are_the_ones_datasets_resolves(tmp_path):
    """The same layouts `datasets.load_dataset(folder)` reads: split names in folders first, then in file names."""
    data_files = pytest.importorskip("datasets.data_files")
    layouts = {
        "by_file_name": ["data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet",
                         "data/test-00000-of-00001.parquet"],
        "by_folder": ["train/a.parquet", "train/b.parquet", "dev/c.parquet", "testing/d.parquet"],
        "plain_names": ["my_train.parquet", "val.parquet", "eval_set.parquet"],
    }  # fmt: skip
    for name, paths in layouts.items():
        root = tmp_path / name
        for relative in paths:
            parquet(root / relative, ["text"])
        ours = hub_splits(resolve_files(str(root)), root)
        patterns = data_files.get_data_patterns(str(root))
        theirs = data_files.DataFilesDict.from_patterns(patterns, base_path=str(root))
        assert {split: sorted(names(files)) for split, files in ours.items()} == {
            split: sorted(names(files)) for split, files in theirs.items()
        }, name
    assert hub_splits(resolve_files(str(VERDICT.parent)), VERDICT.parent) is None  # no split names: all train


def test_a_file_in_both_training_and_validation_is_refused(tmp_path):
    root = hub_layout(tmp_path / "hub")
    shard = root / "data" / "train-00000-of-00002.parquet"
    with pytest.raises(UserError, match="validation data: .*train-00000-of-00002.parquet is in the training data too"):
        resolve_data(str(root), str(shard))
    with pytest.raises(UserError, match=r"is in the training data too \(1 such file\)"):
        resolve_data(str(VERDICT), str(VERDICT))
    os.symlink(VERDICT, tmp_path / "verdict-link.txt")  # the same file under another name is still the same file
    with pytest.raises(UserError, match="is in the training data too"):
        resolve_data(str(VERDICT), str(tmp_path / "verdict-link.txt"))
    parquet(tmp_path / "both" / "train_and_validation.parquet", ["x"])
    parquet(tmp_path / "both" / "train.parquet", ["y"])
    with pytest.raises(UserError, match="train_and_validation.parquet is named for two splits"):
        resolve_data(str(tmp_path / "both"), None)


def test_a_plain_folder_whose_names_hold_a_keyword_trains_on_every_file(tmp_path):
    """Only a layout where every corpus file is in a split, with a train split, is read as one."""
    for folder, names_ in {
        "books": ["novel.txt", "test-driven-development.txt"],  # no train split
        "manuals": ["novel.txt", "training-manual.txt", "poems.txt"],  # files in no split
        "notes": ["dev-notes/a.txt", "essays/b.txt"],
    }.items():
        for name in names_:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_text(f"The text of {name}.")
        files = resolve_data(str(tmp_path / folder), None)
        assert sorted(names(files.train)) == sorted(Path(n).name for n in names_), folder
        assert files.validation is None and files.note == "", folder


def test_a_link_cycle_and_links_to_one_file_read_each_file_once(tmp_path):
    corpus = tmp_path / "loop"
    (corpus / "a").mkdir(parents=True)
    (corpus / "a" / "one.txt").write_text("one")
    (corpus / "two.txt").write_text("two")
    os.symlink("..", corpus / "a" / "up")  # a cycle: loop/a/up/a/up/... is loop again
    os.symlink(corpus / "a", corpus / "a-again")  # a second way into the same folder
    os.symlink(corpus / "two.txt", corpus / "a" / "also-two.txt")  # a second name for one file
    found = resolve_files(str(corpus))
    assert sorted(os.path.realpath(p) for p in found) == sorted(
        os.path.realpath(p) for p in (corpus / "a" / "one.txt", corpus / "two.txt")
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_text_column_reads_another_column_or_field(tmp_path, suffix):
    texts = ["The first document.", "Der zweite, mit Umlauten: äöü.", "第三个文件。"]
    if suffix == ".jsonl":
        (tmp_path / f"content{suffix}").write_text(
            "".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(texts))
        )
    else:
        parquet(tmp_path / f"content{suffix}", texts, column="content")
    expected = []
    for text in texts:
        (tmp_path / "one.txt").write_text(text)
        expected += tokens(tokenize_corpus(str(tmp_path / "one.txt"), "gpt2", EOS, tmp_path / "c1")[0])
    path = str(tmp_path / f"content{suffix}")
    assert tokens(tokenize_corpus(path, "gpt2", EOS, tmp_path / "c2", text_column="content")[0]) == expected
    with pytest.raises(UserError, match="--text_column names another"):
        tokenize_corpus(str(tmp_path / f"content{suffix}"), "gpt2", EOS, tmp_path / "c3")


@pytest.mark.slow
def test_training_on_a_hub_layout_through_the_command_line(tmp_path, train_here):
    root = hub_layout(tmp_path / "hub")
    args = ["--model", "tiny", "--train_data_path", root, "--data_cache_dir", tmp_path / "c", "--output_dir",
            tmp_path / "run", "--max_steps", 2, "--warmup_steps", 1, "--eval_freq", 2, "--eval_iter", 1]  # fmt: skip
    result = train_here(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is laid out in splits: training on its 2 train files, validating on its 1 validation file" in result.stdout
    entries = sorted((tmp_path / "c").glob("tokens-*/meta.json"))
    listed = sorted(name for entry in entries for name in names(json.loads(entry.read_text())["files"]))
    assert listed == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000-of-00001.parquet"
    ]  # fmt: skip
    refused = train_here(
        *args, "--output_dir", tmp_path / "refused", "--val_data_path", root / "data" / "train-00001-of-00002.parquet"
    )
    assert_one_line_error(refused, "validation data:", "train-00001-of-00002.parquet is in the training data too")


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_text_and_json_lines_read_as_the_plain_files(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    plain = {"a.jsonl": '{"text": "Erste Zeile."}\n{"text": "第二行。"}\n', "b.txt": VERDICT.read_text()[:3000]}
    for name, text in plain.items():
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / name).write_text(text)
        (tmp_path / "packed").mkdir(exist_ok=True)
        with opener(tmp_path / "packed" / f"{name}{suffix}", "wt", encoding="utf-8") as f:
            f.write(text)
        expected = tokens(tokenize_corpus(str(tmp_path / "plain" / name), "gpt2", EOS, tmp_path / "c")[0])
        got = tokenize_corpus(str(tmp_path / "packed" / f"{name}{suffix}"), "gpt2", EOS, tmp_path / "c")[0]
        assert tokens(got) == expected, name
    with pytest.raises(UserError, match=r"mixes file formats \(json: .*a.jsonl.*, text: .*b.txt"):
        tokenize_corpus(str(tmp_path / "packed"), "gpt2", EOS, tmp_path / "c")
    with opener(tmp_path / f"latin1.txt{suffix}", "wb") as f:
        f.write("schön".encode("latin-1"))
    with pytest.raises(UserError, match="byte offset 3 of the decompressed text"):
        tokenize_corpus(str(tmp_path / f"latin1.txt{suffix}"), "gpt2", EOS, tmp_path / "c")


def test_a_hub_snapshot_with_metadata_and_compressed_json_shards(tmp_path):
    """As a downloaded repository holds it: .jsonl.gz shards per split beside dataset_infos.json and a README."""
    import gzip

    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    for split, text in (("train", "Training text. " * 40), ("validation", "Held-out text. " * 10), ("test", "No.")):
        with gzip.open(root / "data" / f"{split}-00000-of-00001.jsonl.gz", "wt") as f:
            f.write(json.dumps({"content": text}) + "\n")
    (root / "dataset_infos.json").write_text('{"default": {"features": {"content": {"dtype": "string"}}}}')
    files = resolve_data(str(root), None)
    assert names(files.train) == ["train-00000-of-00001.jsonl.gz"]
    assert names(files.validation) == ["validation-00000-of-00001.jsonl.gz"]
    assert files.note.endswith("(1 test file not used)")  # dataset_infos.json is metadata, not a split
    stream = tokenize_corpus(str(root), "gpt2", EOS, tmp_path / "c", text_column="content", files=files.train)[0]
    assert tokens(stream)[-1] == EOS and len(tokens(stream)) > 40


@pytest.mark.slow
def test_dataset_through_load_dataset_gives_the_losses_of_the_same_files(tmp_path, train_here):
    """`--dataset FOLDER` reads the splits `datasets.load_dataset` makes of a hub layout; its tokens, and so the
    run's losses, are those of the same folder as a data path."""
    root = hub_layout(tmp_path / "hub")
    common = ["--model", "tiny", "--data_cache_dir", tmp_path / "c", "--max_steps", 3, "--warmup_steps", 1,
              "--eval_freq", 3, "--eval_iter", 1, "--dropout", 0.0]  # fmt: skip
    as_dataset = train_here(*common, "--dataset", root, "--output_dir", tmp_path / "ds")
    assert as_dataset.returncode == 0, as_dataset.stderr[-3000:]
    assert f"dataset {root}: training on its train split (3 rows), validating on its validation split (1 rows)" in (
        as_dataset.stdout
    )
    as_files = train_here(*common, "--train_data_path", root, "--output_dir", tmp_path / "files")
    assert as_files.returncode == 0, as_files.stderr[-3000:]
    runs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ds", "files")]  # fmt: skip
    assert [(r["loss"], r.get("val_loss")) for r in runs[0]] == [(r["loss"], r.get("val_loss")) for r in runs[1]]


@pytest.mark.slow
def test_dataset_errors_are_one_line(tmp_path, train_here):
    root = hub_layout(tmp_path / "hub")
    base = ["--model", "tiny", "--data_cache_dir", tmp_path / "c", "--output_dir", tmp_path / "run"]
    assert_one_line_error(
        train_here(*base, "--dataset", "someone/not-cached-here"),
        "dataset 'someone/not-cached-here' is not in the local Hugging Face cache",
        "fetch it once where there is network",
    )
    assert_one_line_error(
        train_here(*base, "--dataset", root, "--train_split", "training"),
        "has no split 'training' (splits: train, validation, test): pass --train_split",
    )
    assert_one_line_error(
        train_here(*base, "--dataset", root, "--val_data_path", VERDICT), "choose the validation one with val_split"
    )
    assert_one_line_error(
        train_here(*base, "--dataset", root, "--text_column", "content"), "has no 'content' column", "--text_column"
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_compressed_file_is_one_line(tmp_path, damage):
    import gzip

    packed = gzip.compress(VERDICT.read_bytes())
    path = tmp_path / "verdict.txt.gz"
    path.write_bytes(packed[: len(packed) // 2] if damage == "truncated" else packed[:20] + b"\xff" * 40 + packed[60:])
    with pytest.raises(UserError, match="verdict.txt.gz is damaged or truncated"):
        tokenize_corpus(str(path), "gpt2", EOS, tmp_path / "cache")


def test_a_gz_name_on_a_file_that_is_not_gzip_never_reuses_the_plain_files_tokens(tmp_path):
    """The cache key holds how a file is read: `a.txt.gz` holding `a.txt`'s bytes is not `a.txt`'s text, so the
    outcome never depends on what the cache holds (issue 25: it trained on `a.txt`'s cached tokens)."""
    plain, named_gz = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_bytes(VERDICT.read_bytes())
    named_gz.write_bytes(VERDICT.read_bytes())
    tokenize_corpus(str(plain), "gpt2", EOS, tmp_path / "cache")  # a.txt's tokens are in the cache now
    with pytest.raises(UserError, match=r"a.txt.gz is not gzip-compressed, as its name says"):  # as with a fresh cache
        tokenize_corpus(str(named_gz), "gpt2", EOS, tmp_path / "cache")


def test_failed_tokenization_leaves_nothing_in_the_cache(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text, then " + "schön".encode("latin-1"))
    with pytest.raises(UserError, match="is not valid UTF-8"):
        tokenize_corpus(str(bad), "gpt2", EOS, tmp_path / "cache")
    assert list((tmp_path / "cache").glob("tokens-*")) == []


def test_what_is_not_a_corpus_folder_says_what_to_pass_instead(tmp_path):
    cached = tmp_path / "hf-cache" / "someone___corpus" / "default" / "0.0.0" / "abc123"
    cached.mkdir(parents=True)
    (cached / "dataset_info.json").write_text("{}")
    (cached / "corpus-train.arrow").write_bytes(b"")
    with pytest.raises(UserError, match="holds the Arrow files of a `datasets` cache.*--dataset"):
        resolve_files(str(tmp_path / "hf-cache"))
    with pytest.raises(UserError, match=r"data path not found: Salesforce/wikitext \(a Hugging Face dataset by name"):
        resolve_files("Salesforce/wikitext")
    with pytest.raises(UserError, match=r"data path not found: nope\.txt$"):
        resolve_files("nope.txt")
    for spec in ("/dev/null", "/dev/nul[l]"):  # not "matches only directories"
        with pytest.raises(UserError, match=r"^/dev/null is not a regular file or a directory"):
            resolve_files(spec)
