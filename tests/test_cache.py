"""The token cache: a damaged entry is rebuilt with one warning, concurrent builders agree, users list and prune."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, VERDICT, assert_one_line_error, common_args, in_process, read_metrics, train_cli

from accel_gpt import cache as cache_command
from accel_gpt.data import cache
from accel_gpt.data.tokens import tokenize_corpus

EOS = 50256


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def flip_one_byte(path):  # same size, still a readable Arrow file: only the hash sees it
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def garbage_meta(path):
    (path.parent / cache.META).write_text("{not json")


@pytest.mark.parametrize("damage", [truncate, random_bytes, flip_one_byte, garbage_meta])
def test_a_damaged_entry_is_reported_once_and_rebuilt(tmp_path, caplog, damage):
    first, _ = tokenize_corpus(str(VERDICT), "gpt2", EOS, tmp_path)
    expected = first.read(0, len(first)).tolist()
    damage(first.paths[0])
    with caplog.at_level(logging.WARNING):
        again, hit = tokenize_corpus(str(VERDICT), "gpt2", EOS, tmp_path, role="validation")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "is damaged" in warnings[0]
    assert warnings[0].startswith("validation data: the token cache")
    assert not hit and again.read(0, len(again)).tolist() == expected
    assert cache.check(again.paths[0].parent) is None and again.paths[0] == first.paths[0]
    assert not [p for p in again.paths[0].parent.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.slow
def test_concurrent_builders_both_finish_with_the_same_valid_cache(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (REPO / "accel_gpt" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    for i in range(6):  # ~2M tokens: both are tokenizing at the same time
        (corpus / f"part{i}.txt").write_text(f"Part {i}.\n{text}", encoding="utf-8")
    child = f"""
import json, os, sys, time
from accel_gpt.data.tokens import tokenize_corpus
open(sys.argv[1] + '.ready', 'w').close()
while not os.path.exists({str(tmp_path / "go")!r}):
    time.sleep(0.01)
stream, hit = tokenize_corpus({str(corpus)!r}, 'gpt2', {EOS}, {str(tmp_path / "cache")!r})
print(json.dumps({{'hit': hit, 'tokens': len(stream), 'head': stream.read(0, 50).tolist()}}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(tmp_path / f"p{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"p{i}.ready").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0] == results[1] and not results[0]["hit"]  # both built it, and got the same tokens
    (entry,) = (tmp_path / "cache").iterdir()
    assert cache.check(entry) is None and sorted(p.name for p in entry.iterdir()) == [cache.META, cache.TOKENS]


@pytest.mark.slow
def test_two_runs_started_together_share_one_valid_cache_through_the_cli(tmp_path):
    """Two jobs on one corpus and one cache, started at the same moment (an array job, say): both train, one entry
    results, and both trained on the same tokens."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (REPO / "accel_gpt" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    for i in range(4):  # ~1.4M tokens: seconds of tokenizing, so the builds most likely overlap (forced above)
        (corpus / f"part{i}.txt").write_text(f"Part {i}.\n{text}", encoding="utf-8")
    runs = [tmp_path / f"run{i}" for i in range(2)]
    # One thread each (common_args): the two processes compute alike by construction whatever else the machine runs
    # (with a thread per core each, 10.836809 and 10.836794 were seen once at step 1 under xdist).
    args = ["--max_steps", "3", "--eval_freq", "3", "--save_freq", "100", "--train_data_path", str(corpus)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "accel_gpt.train", *common_args(run, tmp_path / "cache"), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in runs
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    (entry,) = cache.scan(tmp_path / "cache")
    assert entry.status == "ok" and entry.tokens > 1_000_000
    first, second = (read_metrics(run) for run in runs)
    # The same tokens (as many windows of them, in the same order), and losses equal to float rounding.
    assert [yaml.safe_load((run / "config.yaml").read_text())["train_windows"] for run in runs] == [8450, 8450]
    assert [r["loss"] for r in first.values()] == pytest.approx([r["loss"] for r in second.values()], rel=1e-6)
    assert first[3]["val_loss"] == pytest.approx(second[3]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_damaged_cache_does_not_stop_a_run_and_changes_no_loss(tmp_path, train_here):
    """Issue 10's acceptance: corrupt the cache, run the CLI: one warning, a rebuilt cache, the same losses."""
    args = ["--max_steps", "4", "--eval_freq", "2", "--save_freq", "100"]
    fresh = train_here(*common_args(tmp_path / "fresh", tmp_path / "cache"), *args)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (entry,) = [item.path for item in cache.scan(tmp_path / "cache")]  # beside it: the run's CPU peak record
    random_bytes(entry / cache.TOKENS)
    healed = train_cli(  # its own process: the warning is what a user sees on stderr
        *common_args(tmp_path / "healed", tmp_path / "cache"), *args
    )
    assert healed.returncode == 0 and "Traceback" not in healed.stderr, healed.stderr[-3000:]
    mentions = [line for line in healed.stderr.splitlines() if "token cache" in line]
    assert len(mentions) == 1 and "is damaged" in mentions[0] and "rebuilding it" in mentions[0], healed.stderr
    assert cache.check(entry) is None
    fresh_losses, healed_losses = (
        [(r["loss"], r.get("val_loss")) for _, r in sorted(read_metrics(tmp_path / run).items())]
        for run in ("fresh", "healed")
    )
    assert len(fresh_losses) == 4 and fresh_losses[1][1] is not None and healed_losses == fresh_losses


@pytest.mark.slow
def test_prune_refuses_a_negative_age(tmp_path, capfd):
    from accel_gpt.cache import main

    result = in_process(main, ["--data_cache_dir", tmp_path, "prune", "--unused_days", "-1"], capfd)
    assert_one_line_error(result, "unused_days must be a number of days >= 0, got -1.0")


def test_the_cache_cli_lists_and_prunes(tmp_path, capsys):
    root = tmp_path / "cache"
    good, _ = tokenize_corpus(str(VERDICT), "gpt2", EOS, root)
    other = tmp_path / "other.txt"
    other.write_text("Another corpus, soon damaged.", encoding="utf-8")
    damaged, _ = tokenize_corpus(str(other), "gpt2", EOS, root)
    truncate(damaged.paths[0])
    busy = root / "tokens-0123456789abcdef01234567"  # a run is tokenizing into it right now
    busy.mkdir()
    (busy / ".tokens-feed.arrow").write_bytes(b"x" * 100)
    stale = good.paths[0].parent / ".tokens-dead.arrow"  # left by a run killed while writing
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 2 * cache.BUSY_SECONDS,) * 2)
    (root / "hf" / "json").mkdir(parents=True)
    (root / "hf" / "json" / "raw.arrow").write_bytes(b"x" * 5000)

    listing = subprocess.run(
        [sys.executable, "-m", "accel_gpt.cache", "--data_cache_dir", str(root), "list"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].startswith(f"{root}: 4 entries")
    status = {
        name: line
        for line in lines
        for name in ("hf", good.paths[0].parent.name, damaged.paths[0].parent.name, busy.name)
        if line.strip().startswith(name)
    }
    assert " ok " in status[good.paths[0].parent.name] and str(VERDICT) in status[good.paths[0].parent.name]
    assert "tokens.arrow has" in status[damaged.paths[0].parent.name] and "busy" in status[busy.name]
    assert "obsolete: raw corpus copies" in status["hf"]

    cache_command.main(["--data_cache_dir", str(root), "prune", "--dry_run"])
    assert "would free" in capsys.readouterr().out and (root / "hf").exists() and stale.exists()
    cache_command.main(["--data_cache_dir", str(root), "prune"])
    out = capsys.readouterr().out
    assert not (root / "hf").exists() and not damaged.paths[0].parent.exists() and not stale.exists()
    assert busy.exists() and "kept" in out and cache.check(good.paths[0].parent) is None
    cache_command.main(["--data_cache_dir", str(root), "prune", "--unused_days", "2"])
    assert good.paths[0].parent.exists()  # used just now
    os.utime(good.paths[0].parent, (time.time() - 3 * 86400,) * 2)
    cache_command.main(["--data_cache_dir", str(root), "prune", "--unused_days", "2"])
    assert not good.paths[0].parent.exists() and "unused for 2 days" in capsys.readouterr().out
    assert tokenize_corpus(str(VERDICT), "gpt2", EOS, root)[1] is False  # pruned: built again on next use
