"""`python -m accel_gpt.batches`: what each process would train on, as training deals it out."""

import json
import subprocess

import pytest
from conftest import VERDICT, launch_command, launch_env, one_thread

from accel_gpt.batches import main
from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow  # one launch of two processes


def windows_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_batches_show_the_windows_of_each_step_alike_at_one_and_two_processes(tmp_path, capfd):
    args = ["--model", "tiny", "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "cache",
            "--context_len", "32", "--steps", "3", "--json"]  # fmt: skip
    main([str(a) for a in one_thread([*args, "--batch_size", "4"])])
    out, err = capfd.readouterr()
    one = windows_of(out)  # standard output holds the windows alone; tokenizing speaks on stderr
    assert "tokenized train data" in err
    assert [(w["step"], w["rank"], w["micro_batch"]) for w in one] == [(s, 0, 0) for s in (1, 2, 3) for _ in range(4)]
    corpus = " ".join(map(str, get_tokenizer().encode_ordinary(VERDICT.read_text()) + [50256]))
    for window in one:  # 33 consecutive tokens of the corpus (a window and its last target), decoded
        assert len(window["tokens"]) == 33 and " ".join(map(str, window["tokens"])) in corpus
        assert window["text"] == get_tokenizer().decode(window["tokens"]) and window["source"] == str(VERDICT)

    command = launch_command(2, module="batches") + [str(a) for a in one_thread([*args, "--batch_size", "2"])]
    two = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    two = windows_of(two.stdout)  # printed once, by the main process, for both
    for step in (1, 2, 3):  # the global batch of a step is the same windows at any world size, half to each rank
        ranks = [w["rank"] for w in two if w["step"] == step]
        assert sorted(ranks) == [0, 0, 1, 1]
        assert sorted(w["tokens"] for w in two if w["step"] == step) == sorted(
            w["tokens"] for w in one if w["step"] == step
        )


def test_batches_of_a_resumed_run_are_refused_in_one_line():
    with pytest.raises(UserError, match="batches shows a run's first steps: drop --checkpoint"):
        main(["--checkpoint", "latest", "--output_dir", "anywhere", "--cpu_threads", "1"])


def test_batches_text_names_each_window_and_its_document_ends(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document number {i} is short."}) + "\n" for i in range(40)))
    main(["--model", "tiny", "--train_data_path", str(corpus), "--data_cache_dir", str(tmp_path / "cache"),
          "--context_len", "16", "--batch_size", "1", "--warmup_steps", "1", "--cpu_threads", "1"])  # fmt: skip
    header, text, blank = capsys.readouterr().out.splitlines()[:3]
    assert header.startswith(f"step 1 | rank 0 | micro-batch 0 | {corpus} | 17 tokens, documents end at tokens ")
    assert "<|endoftext|>" in text and blank == ""
