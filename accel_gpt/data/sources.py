"""Corpus files and their documents: a data path (file, directory, glob, hub split layout, bundled corpus, folder
saved by `datasets`, or a dataset by name) resolved to files, and each file read as documents, piece by piece.

Reading never holds a whole file or document in memory: text comes in pieces of at most PIECE_CHARS characters,
cut where the tokenizer would start a new pre-token anyway, so the pieces' tokens are the whole text's.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import glob
import gzip
import io
import json
import lzma
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from accel_gpt.errors import UserError

BUNDLED_CORPORA = {"the-verdict": "the-verdict.txt", "tinyshakespeare": "tinyshakespeare.txt", "xiyouji": "xiyouji.txt"}
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Text and JSON lines may come compressed, as hub datasets often ship them (parquet compresses its own pages).
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
COMPRESSIBLE = ("text", "json")
PIECE_CHARS = 1 << 20  # most characters tokenized at once: a longer document is cut into pieces of this size
TABLE_ROWS = 256  # rows decoded at once from a parquet file or saved dataset (parquet: and its row-group size)
DATASET_FILES = ("dataset_info.json", "state.json")  # what Dataset.save_to_disk writes beside its .arrow shards
DATASET_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes beside one Dataset folder per split


# ----------------------------------------------------------------------------------------------- corpus files
def resolve_files(spec: str) -> list[Path]:
    """A file, a saved Hugging Face Dataset folder, a directory (searched recursively), a glob, or a bundled corpus
    name -> sorted data files (for a Dataset, its folder alone).

    Searching a directory or glob skips hidden names (starting with '.'): notebook checkpoints, editor backups and
    macOS `._` sidecars are copies or binary, not text to train on."""
    if not spec.strip():
        raise UserError("the data path is empty (an unset shell variable?)")
    if spec in BUNDLED_CORPORA and not Path(spec).exists():
        return [Path(str(resources.files("accel_gpt") / "assets" / BUNDLED_CORPORA[spec]))]
    path = Path(spec).expanduser()
    if path.is_file():
        candidates = [path]
    elif _is_saved_dataset(path):  # its .json and .arrow files are the dataset's own, not corpus files to search
        return [path]
    elif path.is_dir():
        candidates = _search(path)
    else:
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]  # wildcards never match hidden names
        if not matches:
            by_name = not path.suffix and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec)  # e.g. Salesforce/wikitext
            hint = " (a Hugging Face dataset by name goes to --dataset)" if by_name else ""
            raise UserError(f"data path not found: {spec}{hint}")
        candidates = [p for p in matches if p.is_file()]
        if not candidates and not any(p.is_dir() for p in matches):  # a device, a pipe, a socket: /dev/null
            raise UserError(
                f"{matches[0]} is not a regular file or a directory: pass a corpus file, a directory or a glob"
            )
        if not candidates:
            raise UserError(
                f"{spec} matches only directories ({matches[0]}, ...): pass a directory, or a pattern "
                "that matches files"
            )
    files = _once(sorted(p for p in candidates if _file_format(p)))
    if not files:
        raise UserError(f"no .txt, .jsonl or .parquet files (or .txt/.jsonl compressed as .gz, .bz2, .xz) in {spec}")
    return files


def _file_format(path: Path) -> str | None:
    """ "text", "json" or "parquet" for a corpus file's name (compressed text and JSON lines too), else None."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        inner = FORMATS.get(suffixes[0]) if len(suffixes) == 2 else None
        return inner if inner in COMPRESSIBLE else None
    return FORMATS.get(suffixes[-1]) if suffixes else None


def is_corpus_file(path: Path) -> bool:
    """Whether a data path that finds `path` reads it as corpus text (by its name, as `resolve_files` does)."""
    return _file_format(path) is not None


def has_wildcards(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def one_format(spec: str, files: list[Path]) -> str:
    """The format that `files` share; else the error that names a file of each."""
    formats = {}
    for path in files:
        formats.setdefault(format_of(path), path)
    if len(formats) > 1:
        examples = ", ".join(f"{fmt}: {path}" for fmt, path in sorted(formats.items()))
        raise UserError(f"{spec} mixes file formats ({examples}); use one format per data path")
    return next(iter(formats))


def compression_of(path: Path) -> str | None:
    """The compression a corpus file is read with, from its name (".gz", ...), or None."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def _open(path: Path):
    """A corpus file as bytes, decompressed as its name says."""
    return COMPRESSIONS.get(compression_of(path), open)(path, "rb")


# Hugging Face's split names, as `datasets` reads them from a repository's folder and file names: a keyword between
# separators (`data/train-00000-of-00002.parquet`, `validation.jsonl`, `data/test/part.txt`).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "[-._ 0-9]"
_IN_FOLDER = {s: re.compile(f"(?:^|{_SEP})(?:{'|'.join(w)})(?:{_SEP}|$)") for s, w in SPLIT_KEYWORDS.items()}
_IN_FILE_NAME = {s: re.compile(f"(?:^|{_SEP})(?:{'|'.join(w)}){_SEP}") for s, w in SPLIT_KEYWORDS.items()}


# What a hub repository holds beside its split files: metadata, never corpus text.
HUB_METADATA = ("dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json")


def hub_splits(files: list[Path], root: Path) -> dict[str, list[Path]] | None:
    """The files of each split when `files` are laid out like a hub repository (split names in their folders,
    else in their file names, below `root`, as `datasets` reads them), else None.

    Laid out means: a train split, and every corpus file in some split (metadata such as dataset_infos.json
    aside). A plain folder whose names only happen to hold a keyword (`test-driven-development.txt` beside
    `novel.txt`) is not a layout, and trains on all its files as before. In a layout, a file named for two splits
    is an error: it would be trained and validated on."""
    corpus = [p for p in files if p.name not in HUB_METADATA]
    for scheme in ("folder", "file name"):
        splits: dict[str, list[Path]] = {}
        for path in corpus:
            relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
            if scheme == "folder":
                named = {s for s, pattern in _IN_FOLDER.items() for part in relative.parts[:-1] if pattern.search(part)}
            else:
                named = {s for s, pattern in _IN_FILE_NAME.items() if pattern.search(relative.name)}
            splits.setdefault("+".join(sorted(named)), []).append(path)  # "": no split; "a+b": named for two
        if "" in splits or not any("train" in split for split in splits):
            continue
        if two := next((split for split in splits if "+" in split), None):
            raise UserError(f"{splits[two][0]} is named for two splits ({two.replace('+', ' and ')}) by its {scheme}")
        return splits
    return None


def _search_root(spec: str) -> Path:
    """The folder a directory or glob names files below: the glob's leading part without wildcards."""
    parts = Path(spec).expanduser().parts
    wild = next((i for i, part in enumerate(parts) if has_wildcards(part)), len(parts))
    return Path(*parts[:wild]) if wild else Path(".")


def _count(n: int, what: str) -> str:
    return f"{n} {what} file{'s' * (n != 1)}"


@dataclass
class DataFiles:
    train: list[Path]
    validation: list[Path] | None  # None: the run holds out val_fraction of the training tokens
    note: str  # what a split layout decided, for the console; "" when there was nothing to decide


def resolve_data(train_spec: str, val_spec: str | None) -> DataFiles:
    """The training and validation files of a run. A directory or glob laid out in hub splits trains on its train
    files and, unless `val_spec` is given, validates on its validation files; a file in both is refused."""
    train, note = _files_for("train", train_spec), ""
    validation = None if val_spec is None else _files_for("validation", val_spec)
    one_file = len(train) == 1 and Path(train_spec).expanduser().is_file()
    splits = None if one_file else hub_splits(train, _search_root(train_spec))
    if splits is not None:
        train = splits.pop("train")
        note = f"train data: {train_spec} is laid out in splits: training on its {_count(len(train), 'train')}"
        if validation is None and "validation" in splits:
            validation = splits.pop("validation")
            note += f", validating on its {_count(len(validation), 'validation')}"
        if splits:
            note += f" ({', '.join(_count(len(f), s) for s, f in sorted(splits.items()))} not used)"
    if validation is not None:
        in_train = {os.path.realpath(p) for p in train}
        if shared := [p for p in validation if os.path.realpath(p) in in_train]:
            raise UserError(
                f"validation data: {shared[0]} is in the training data too ({_count(len(shared), 'such')}): "
                "train and validate on separate files"
            )
    return DataFiles(train, validation, note)


def scored_files(spec: str, split: str | None = None) -> tuple[list[Path], str | None, str]:
    """The files of data path `spec` to score (evaluate, perplexity), read as training reads it: one split of a folder
    laid out in hub splits (`split`, default validation: scoring every split would score training text), every file
    of anything else; the split scored (None: not a split layout); and the line that says which files those are."""
    path = Path(spec).expanduser()
    if (path / DATASET_DICT_FILE).is_file():  # saved by DatasetDict.save_to_disk: a folder per split
        split = split or "validation"
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_saved_dataset(p))
        if split not in splits:
            raise UserError(
                f"{spec} is a saved DatasetDict with no {split} split (splits: {', '.join(splits)}): pass --split"
            )
        return [path / split], split, f"{spec} is a saved DatasetDict: scoring its {split} split"
    files = _files_for("evaluation", spec)
    one_file = len(files) == 1 and path.is_file()
    splits = None if one_file else hub_splits(files, _search_root(spec))
    if splits is None:
        if split is not None:
            raise UserError(f"--split {split}: {spec} is not laid out in splits (train/validation/test file names)")
        shown = str(files[0]) if len(files) == 1 else f"{_count(len(files), 'corpus')} of {spec}"
        return files, None, f"scoring {shown}"
    split = split or "validation"
    if split not in splits:
        available = ", ".join(sorted(splits))
        raise UserError(f"{spec} is laid out in splits ({available}) and has no {split} split: pass --split")
    others = ", ".join(_count(len(f), s) for s, f in sorted(splits.items()) if s != split)
    note = f"{spec} is laid out in splits: scoring its {_count(len(splits[split]), split)} ({others} not scored)"
    return splits[split], split, note


@contextlib.contextmanager
def dataset_errors(name: str, unreachable: str):
    """What `datasets` raises while loading dataset `name`, as one line: a missing dataset, config or file, a bad
    name; where the Hub cannot be reached, `unreachable` (a format string of `err`) says what that means here."""
    import datasets  # here only: importing it takes seconds

    try:
        yield
    except ConnectionError as err:  # offline, or no network: what `datasets` says when nothing is cached
        raise UserError(f"dataset {name!r} " + unreachable.format(err=err)) from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise UserError(f"dataset {name!r}: {str(err).splitlines()[0]}") from None


def check_split(name: str, split: str, splits: Iterable[str], option: str | None = None) -> None:
    """Refuse a split the dataset does not have, naming those it has (and the option that chooses it)."""
    if split not in splits:
        hint = f": pass --{option}" if option else ""
        raise UserError(f"dataset {name!r} has no split {split!r} (splits: {', '.join(splits)}){hint}")


def validation_split(name: str, splits: Iterable[str], train_split: str, val_split: str | None) -> str | None:
    """The split a dataset's run validates on: `val_split`, else its "validation" split if it has one (None: hold
    out val_fraction of training's tokens); both splits checked, and never the training split."""
    splits = list(splits)
    check_split(name, train_split, splits, "train_split")
    if val_split is not None:
        check_split(name, val_split, splits, "val_split")
    val_split = val_split or ("validation" if "validation" in splits else None)
    if val_split == train_split:
        raise UserError(f"dataset {name!r}: train_split and val_split are both {train_split!r}")
    return val_split


def load_dataset_splits(name: str, config: str | None, train_split: str, val_split: str | None) -> DataFiles:
    """The Arrow files `datasets.load_dataset` prepares in its cache for a dataset's training split and validation
    split (`validation_split`), and the line that says which splits were taken. Reads them as they are
    (memory-mapped, no copy); their content keys the token cache like any file's."""
    import datasets  # here only: importing it takes seconds

    if not sys.stderr.isatty():  # as for tokenizing: for bad input the error is the only line
        datasets.disable_progress_bars()
    how = f"datasets.load_dataset({name!r}{f', {config!r}' if config else ''})"
    unreachable = (
        "is not in the local Hugging Face cache and the Hub cannot be reached ({err}); fetch it once where there "
        f'is network: python -c "import datasets; {how}"'
    )
    with dataset_errors(name, unreachable):
        splits = datasets.load_dataset(name, config, keep_in_memory=False)
    val_split = validation_split(name, splits, train_split, val_split)

    def arrow_files(split: str) -> list[Path]:
        if splits[split]._indices is not None:  # a selection over the table: its files hold other rows too
            raise UserError(f"dataset {name!r} split {split!r} is a selection of its table, not whole Arrow files")
        files = [Path(f["filename"]) for f in splits[split].cache_files]
        if not files:  # held in memory (HF_DATASETS_IN_MEMORY_MAX_SIZE): no files to read or to key the cache on
            raise UserError(f"dataset {name!r} split {split!r} is held in memory, not in Arrow files")
        return files

    note = f"dataset {name}: training on its {train_split} split ({splits[train_split].num_rows:,} rows)"
    if splits[train_split].info.builder_name == "text":  # datasets' text builder makes a row of every line
        note += " (.txt files through datasets: one document per line; --train_data_path reads one per file)"
    if val_split is not None:
        note += f", validating on its {val_split} split ({splits[val_split].num_rows:,} rows)"
    return DataFiles(arrow_files(train_split), arrow_files(val_split) if val_split else None, note)


def _files_for(role: str, spec: str) -> list[Path]:
    try:
        return resolve_files(spec)
    except UserError as err:
        raise UserError(f"{role} data: {err}") from None


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk`. A `DatasetDict.save_to_disk` folder is refused:
    which split to read is the user's choice (a default would validate on training text), so the error names them."""
    if (path / DATASET_DICT_FILE).is_file():
        splits = sorted(p.name for p in path.iterdir() if _is_saved_dataset(p))
        raise UserError(
            f"{path} is a saved DatasetDict (splits: {', '.join(splits) or 'none'}): pass one split's "
            f"folder, e.g. {path / (splits[0] if splits else 'train')}"
        )
    return all((path / name).is_file() for name in DATASET_FILES)


def _search(root: Path) -> list[Path]:
    def unreadable(err: OSError):  # os.walk would skip the folder and train on the rest
        raise UserError(f"cannot read directory {err.filename}: {err.strerror}")

    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
        if _is_saved_dataset(Path(folder)):  # else its state.json would be read as JSON lines
            raise UserError(
                f"{folder} is a saved Hugging Face dataset inside {root}: pass it as a data path of its own"
            )
        if "dataset_info.json" in names and any(n.endswith(".arrow") for n in names):
            raise UserError(
                f"{folder} holds the Arrow files of a `datasets` cache, not corpus files: pass the dataset's name "
                "or folder with --dataset"
            )
        # Links are followed, but each real folder is walked once: a link back up (a cycle) or a second link to
        # the same folder would put its files into the corpus again.
        seen.add(os.path.realpath(folder))
        kept = []
        for name in sorted(subfolders):
            real = os.path.realpath(Path(folder, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept
        found += [Path(folder, n) for n in names if not n.startswith(".")]
    return [p for p in found if p.is_file()]


def _once(files: list[Path]) -> list[Path]:
    """`files` in order with each real file once: two links to one file are one file of the corpus."""
    seen, once = set(), []
    for path in files:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            once.append(path)
    return once


# ----------------------------------------------------------------------------------------------- reading documents
# A piece may end just before a whitespace character that precedes a non-space one: GPT-2's split pattern starts a
# new pre-token there whatever follows, so the pieces' tokens are exactly the whole text's. Line starts are tried
# first. The class is Unicode's White_Space, what the tokenizer's \s matches (Python's \s also takes \x1c-\x1f).
_LINE_START = re.compile(r"\n(?=\S)")
_WORD_START = re.compile(r"[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?=\S)")


def _cut(text: str, start: int, end: int) -> int:
    """Where to end the piece that starts at `start` and may reach `end`: the last line start (else word start)
    before `end`, searched from the end in growing windows; `end` itself when there is none, the one place where
    a token or two can differ from tokenizing the text whole."""
    for pattern in (_LINE_START, _WORD_START):
        span = 4096
        while True:
            lo = max(start + 1, end - span)
            matches = list(pattern.finditer(text, lo, end + 1))  # end + 1: the lookahead may see text[end]
            if matches:
                return matches[-1].start()
            if lo == start + 1:
                break
            span *= 16
    return end


def pieces(blocks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """One document, given as consecutive blocks of text, as (piece, ends_document) pairs of at most PIECE_CHARS
    characters each; an empty document yields nothing (it gets no end-of-text)."""
    text = ""
    for block in blocks:
        text += block
        start = 0
        while len(text) - start > PIECE_CHARS:
            end = _cut(text, start, start + PIECE_CHARS)
            yield text[start:end], False
            start = end
        text = text[start:]
    if text:
        yield text, True


def _not_utf8(path: Path, reason: str, offset: int) -> UserError:
    with _open(path) as f:
        head = f.read(2)
    if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        hint = "it starts with a UTF-16 byte-order mark: convert it, e.g. iconv -f UTF-16 -t UTF-8"
    else:
        hint = "convert it, e.g. iconv -f GB18030 -t UTF-8"
    where = f"byte offset {offset}" + (" of the decompressed text" if path.suffix.lower() in COMPRESSIONS else "")
    return UserError(f"{path} is not valid UTF-8: {reason} at {where} ({hint})")


def _read_text(path: Path, column: str) -> Iterator[tuple[str, bool]]:
    """A .txt file is one document, decoded and cut as it is read, so memory does not grow with the file."""
    return pieces(_decode_blocks(path))


def _decode_blocks(path: Path) -> Iterator[str]:
    # Line ends become "\n", as in Python's text mode, through which earlier versions read .txt files.
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    offset, first = 0, True
    with _open(path) as f:
        while True:
            block = f.read(PIECE_CHARS)
            held = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err.reason, offset - held + err.start) from None
            if first and text:
                text, first = text.removeprefix("\ufeff"), False  # a UTF-8 byte-order mark is not text
            offset += len(block)
            yield text
            if not block:
                return


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _read_json_lines(path: Path, column: str) -> Iterator[tuple[str, bool]]:
    """One document per line: the `column` field of a JSON object. Blank lines are skipped."""
    offset = 0
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err.reason, offset + err.start) from None
            offset += len(raw)
            line = line.rstrip("\r\n")
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:  # messages read "Expecting value" or "Unterminated string starting at"
                where = f"{'' if err.msg.endswith(' at') else ' at'} column {err.colno}"
                # A first line cut short by its end is how a pretty-printed .json file (valid JSON) starts.
                if number == 1 and err.pos >= len(line.rstrip()):
                    where += (
                        " (one JSON document over several lines? a .json or .jsonl corpus holds one JSON "
                        "object per line)"
                    )
                raise UserError(f"{path} line {number} is not valid JSON: {err.msg}{where}") from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path} line {number} is a JSON {_JSON_TYPES.get(type(row), 'null')}, not an object "
                    f"with a '{column}' field (one JSON object per line)"
                )
            text = row.get(column)
            if not isinstance(text, str):
                if text is None:
                    fields = ", ".join(row)
                    held = f"no '{column}' value (missing or null; fields: {fields}; --text_column names another)"
                else:
                    held = f"a '{column}' {_JSON_TYPES[type(text)]}, not a string"
                raise UserError(f"{path} line {number} has {held}")
            yield from pieces([text])


def _read_parquet(path: Path, column: str) -> Iterator[tuple[str, bool]]:
    """One document per row of the `column` column, decoded TABLE_ROWS rows at a time."""
    parquet = pq.ParquetFile(path)
    check_text_column(path, parquet.schema_arrow, column)
    batches = parquet.iter_batches(batch_size=TABLE_ROWS, columns=[column])
    return text_rows(path, (batch.column(0) for batch in batches), column)


def _read_arrow(path: Path, column: str) -> Iterator[tuple[str, bool]]:
    """One document per row of a `datasets` cache file (the Arrow stream format), memory-mapped."""
    reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    check_text_column(path, reader.schema, column)
    index = reader.schema.get_field_index(column)
    return text_rows(path, (batch.column(index) for batch in reader), column)


def _read_dataset(folder: Path, column: str) -> Iterator[tuple[str, bool]]:
    """One document per row of a saved Dataset's `column` column, TABLE_ROWS rows at a time from its memory-mapped
    shards (`datasets` copies nothing into RAM)."""
    import datasets  # here only: importing it takes seconds, which a run on text files should not pay

    try:
        dataset = datasets.load_from_disk(str(folder), keep_in_memory=False)
    except (KeyError, ValueError) as err:  # a state.json or dataset_info.json that save_to_disk did not write
        raise UserError(f"{folder} is not a readable saved dataset ({type(err).__name__}: {err})") from None
    check_text_column(folder, dataset.data.schema, column)
    batches = dataset.select_columns([column]).with_format("arrow").iter(batch_size=TABLE_ROWS)
    return text_rows(folder, (batch.column(0) for batch in batches), column)


def check_text_column(path: Path, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise UserError(
            f"{path} has no '{column}' column (columns: {', '.join(schema.names)}; --text_column names another)"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"the '{column}' column of {path} holds {kind}, not strings")


def text_rows(path: Path, columns: Iterable[pa.Array | pa.ChunkedArray], name: str) -> Iterator[tuple[str, bool]]:
    """Each string of consecutive slices of the text column `name` as one document."""
    for texts in text_values(path, columns, name):
        for text in texts:
            yield from pieces([text])


def text_values(
    path: Path, columns: Iterable[pa.Array | pa.ChunkedArray], name: str, first_row: int = 0
) -> Iterator[list[str]]:
    """The strings of consecutive slices of the text column `name`, a list per slice; nulls and invalid UTF-8 are
    errors naming the row (counted from `first_row`)."""
    row = first_row
    columns = iter(columns)
    for column in columns:
        if column.null_count:
            first = row + column.is_null().to_pylist().index(True)
            nulls = column.null_count + sum(rest.null_count for rest in columns)  # the whole column's, for the message
            rows = f"{nulls} rows have" if nulls > 1 else "1 row has"
            raise UserError(f"{path}: {rows} no '{name}' value (null), the first at row index {first}")
        try:
            yield column.to_pylist()
        except UnicodeDecodeError as err:  # Arrow writers do not all check that strings are UTF-8
            bad = next(i for i in range(len(column)) if not _decodes(column[i]))
            raise UserError(f"{path} row index {row + bad}: '{name}' is not valid UTF-8 ({err.reason})") from None
        row += len(column)


def _decodes(value: pa.Scalar) -> bool:
    try:
        value.as_py()
    except UnicodeDecodeError:
        return False
    return True


READERS = {
    "text": _read_text, "json": _read_json_lines, "parquet": _read_parquet, "dataset": _read_dataset,
    "arrow": _read_arrow,
}  # fmt: skip


def read_pieces(path: Path, fmt: str, column: str) -> Iterator[tuple[str, bool]]:
    """The documents of one corpus file as (piece, ends_document) pairs, its read errors as one line each."""
    try:
        yield from READERS[fmt](path, column)
    except gzip.BadGzipFile as err:  # an OSError, but not one of reading: the bytes are not what the name says
        raise UserError(f"{path} is not gzip-compressed, as its name says ({err})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except pa.ArrowException as err:
        raise UserError(f"could not read {path}: {err}") from None
    except (EOFError, zlib.error, lzma.LZMAError) as err:  # a compressed file cut short or damaged
        raise UserError(f"{path} is damaged or truncated ({type(err).__name__}: {err})") from None


def format_of(path: Path) -> str:
    """Which reader a corpus file (or a saved dataset's folder) takes; arrow files come from load_dataset_splits."""
    if path.is_dir():
        return "dataset"
    return "arrow" if path.suffix == ".arrow" else _file_format(path)


def dataset_shards(folder: Path) -> list[Path]:
    """The .arrow shards that `datasets.load_from_disk` maps, in its order (state.json's `_data_files`): their bytes
    are the rows, since save_to_disk writes selections and shuffles out in full. Read here, without `datasets`, so
    a cache hit does not pay for importing it."""
    state = folder / "state.json"
    try:
        return [folder / shard["filename"] for shard in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except OSError as err:
        raise UserError(f"cannot read {state}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{state} does not list the dataset's shards ({type(err).__name__}: {err})") from None
