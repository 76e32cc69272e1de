"""Task evaluation: task files in their forms, scoring as lm-evaluation-harness scores, `evaluate --tasks`,
`--eval_tasks` during training, bits per byte, and agreement with lm-eval's own `hf` model."""

import json
import math
import random
from types import SimpleNamespace

import pytest
from conftest import VERDICT, assert_one_line_error, in_process, read_metrics

from accel_gpt import analysis
from accel_gpt.errors import UserError
from accel_gpt.evaluate import main as evaluate_main
from accel_gpt.tasks import (
    Counts,
    Task,
    encode_pair,
    evaluate_task,
    hellaswag_preprocess,
    load_task,
    load_tasks,
    metrics,
)
from accel_gpt.tokenizer import get_tokenizer

# Eight sentences a tiny model memorises in a few dozen steps; their first halves are contexts, second halves targets.
SENTENCES = [
    ("The red fox jumps over", " the lazy brown dog."),
    ("A green frog sits on", " a wet lily pad."),
    ("Seven silver swans swim across", " the cold grey lake."),
    ("My old uncle bakes bread", " every Sunday morning."),
    ("The tall ship sails toward", " the distant northern isles."),
    ("Four little mice hide under", " the kitchen floorboards."),
    ("Her blue kite flies above", " the windy hill."),
    ("Our noisy neighbour plays drums", " late into the night."),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def task_files(tmp_path):
    """The completion task (each sentence's second half after its first), a multiple-choice task whose right
    answer is the true second half among three others, and the same with no true answer among the choices."""
    rng = random.Random(0)
    completion = [{"context": a, "continuation": b} for a, b in SENTENCES]
    right, shuffled = [], []
    for _ in range(5):
        for i, (query, answer) in enumerate(SENTENCES):
            others = [b for j, (_, b) in enumerate(SENTENCES) if j != i]
            choices = [answer.strip(), *(b.strip() for b in rng.sample(others, 3))]
            rng.shuffle(choices)
            right.append({"query": query, "choices": choices, "gold": choices.index(answer.strip())})
            wrong = [b.strip() for b in rng.sample(others, 4)]
            shuffled.append({"query": query, "choices": wrong, "gold": rng.randrange(4)})
    return {
        "completion": write_jsonl(tmp_path / "completion.jsonl", completion),
        "right": write_jsonl(tmp_path / "right.jsonl", right),
        "shuffled": write_jsonl(tmp_path / "shuffled.jsonl", shuffled),
    }


# ----------------------------------------------------------------------------------------------- task files
def test_each_form_is_read_from_its_fields(tmp_path):
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", [{
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he", "label": "3",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing [title] on a roof."],
    }])  # fmt: skip
    task = load_task(str(hellaswag))
    (example,) = task.examples
    assert (task.name, task.form, task.kind) == ("hs", "hellaswag", "multiple_choice")
    assert example.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert example.continuations[3] == " starts pulling up roofing. on a roof." and example.gold == 3
    assert example.choice_chars == tuple(len(c) - 1 for c in example.continuations)  # without the delimiter
    only_ctx = write_jsonl(tmp_path / "ctx_only.jsonl", [{"activity_label": "A", "ctx": "b c", "endings": ["d", "e"],
                                                          "label": 0}])  # fmt: skip
    assert load_task(f"named={only_ctx}").examples[0].context == "A: b c"
    assert load_task(f"named={only_ctx}").name == "named"
    lambada = load_task(str(write_jsonl(tmp_path / "lambada.jsonl", [{"text": "he looked at the door"}])))
    assert (lambada.kind, lambada.examples[0].context, lambada.examples[0].continuations) == (
        "completion",
        "he looked at the",
        (" door",),
    )
    assert hellaswag_preprocess(" A man [title] climbs [step] up  high ") == "A man. climbs up high"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"query": "q", "choices": ["a", "b"], "gold": 2}'], "line 1: the right answer 2 is not an index of its 2"),
        (['{"query": "q", "choices": ["a", "b"], "gold": 0}', "{not json"], "line 2 is not valid JSON"),
        (['{"query": "q", "choices": ["a", "b"], "gold": 0}', "[1]"], "line 2 is not a JSON object"),
        (['{"query": "q", "choices": ["a"], "gold": 0}'], "line 1: a multiple-choice example needs two choices"),
        (['{"query": "q", "choices": ["a", "b"], "gold": 0}', '{"query": "q", "gold": 0}'], "line 2 has no 'choices'"),
        (['{"question": "q", "answer": "a"}'], "line 1: no task form has the fields answer, question"),
        (['{"text": "one"}'], "line 1: 'text' needs at least two words"),
        (['{"context": "a", "continuation": 3}'], "line 1: 3 is not a string"),
        (["", "  "], "holds no examples"),
    ],
)
def test_a_malformed_task_file_is_one_line_naming_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_task(str(path))


def test_task_names_are_unique_and_a_missing_file_is_one_line(tmp_path, task_files):
    with pytest.raises(UserError, match="two tasks are named 'right': name them apart"):
        load_tasks(f"{task_files['right']},{task_files['right']}")
    assert [t.name for t in load_tasks(f"{task_files['right']},again={task_files['right']}")] == ["right", "again"]
    with pytest.raises(UserError, match="task file .*none.jsonl cannot be read"):
        load_tasks(str(tmp_path / "none.jsonl"))


def test_pairs_are_encoded_as_the_harness_encodes_them():
    tokenizer = get_tokenizer()
    context, continuation = encode_pair(tokenizer, "The capital is ", "Paris", 50256)
    assert tokenizer.decode(context) == "The capital is" and tokenizer.decode(continuation) == " Paris"  # space moved
    assert encode_pair(tokenizer, "", "Hello", 50256) == ([50256], tokenizer.encode_ordinary("Hello"))


def test_metrics_are_the_harness_means_and_standard_errors():
    mc = Task("mc", None, "choices", [])
    out = metrics(mc, Counts(examples=4, correct=1, correct_norm=2))
    assert (out["acc"], out["acc_norm"]) == (0.25, 0.5)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))  # sample std / sqrt(n)
    completion = Task("c", None, "context", [])
    lls = [-1.0, -2.0, -4.0]
    out = metrics(completion, Counts(3, 1, 0, sum(lls), sum(x * x for x in lls)))
    assert out["perplexity"] == pytest.approx(math.exp(7 / 3)) and out["acc"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------- scoring
@pytest.mark.slow
def test_an_overfit_model_gets_its_sentences_right_and_shuffled_answers_at_chance(tmp_path, task_files, train_here):
    """Trained (with --eval_tasks) on the eight sentences until it recites them (80 steps): acc 1 on the completion
    task and on the multiple-choice task, chance on the choices without the true answer; logged at each evaluation,
    equal to `evaluate --tasks` on the checkpoint; and val_bpb is the loss per byte of text counted independently."""
    corpus, validation = tmp_path / "sentences.txt", tmp_path / "validation.txt"
    corpus.write_text(" ".join(a + b for a, b in SENTENCES * 30))
    validation.write_text(corpus.read_text())  # a file of its own: one file is never both
    specs = ",".join(f"{name}={path}" for name, path in task_files.items())
    out = tmp_path / "run"
    result = train_here(
        "--model", "tiny", "--train_data_path", corpus, "--val_data_path", validation,
        "--data_cache_dir", tmp_path / "c", "--output_dir", out, "--max_steps", "80", "--warmup_steps", "5",
        "--learning_rate", "1e-2", "--eval_freq", "40", "--eval_iter", "1", "--save_freq", "80", "--batch_size", "4",
        "--context_len", "32", "--sample_tokens", "4", "--peak_flops", "1e11", "--eval_tasks", specs,
        "--eval_task_limit", "40",
        "--position", "rotary",  # a context scored at position 0 was seen in training at other positions
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = read_metrics(out)[80]
    assert last["completion/acc"] == 1.0 and last["right/acc"] == 1.0 and last["right/acc_norm"] == 1.0
    assert last["shuffled/acc"] < 0.5 and last["completion/perplexity"] < 2.0
    assert "right/acc 1.0000" in result.stdout  # on the evaluation's console line
    assert "right/acc" in read_metrics(out)[40] and "right/acc" not in read_metrics(out)[39]  # at evaluations
    figure = tmp_path / "tasks.png"
    analysis.plot_tasks(analysis.load_run(out), path=figure)  # a point per evaluation and score
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 1.0, "lr": 0.1}\n')
    with pytest.raises(UserError, match="no task scores to plot: train with --eval_tasks"):
        analysis.plot_tasks(analysis.load_run(tmp_path / "plain"))
    # The same numbers from the command after training.
    model = analysis.load_model(out)
    for name in task_files:
        scored = evaluate_task(model, load_task(f"{name}={task_files[name]}"), get_tokenizer(), 50256, 40)
        assert scored["acc"] == last[f"{name}/acc"]
    # Bits per byte: the evaluation's windows (the first 4 of the validation text), their bytes counted here.
    tokenizer = get_tokenizer()
    tokens = tokenizer.encode_ordinary(corpus.read_text()) + [50256]
    text_bytes = sum(len(tokenizer.decode_bytes(tokens[w * 32 + 1 : w * 32 + 33])) for w in range(4))
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * 4 * 32 / (text_bytes * math.log(2)), rel=1e-9)


@pytest.mark.slow
def test_evaluate_tasks_prints_a_line_per_task_and_data_with_bits_per_byte(tiny_run, task_files, tmp_path, capfd):
    argv = ["--checkpoint", tiny_run.out, "--data_cache_dir", tiny_run.cache, "--tasks",
            f"{task_files['right']},{task_files['completion']}", "--limit", "16", "--data", VERDICT]  # fmt: skip
    result = in_process(evaluate_main, argv, capfd)
    assert result.returncode == 0, result.stderr
    corpus, right, completion = (json.loads(line) for line in result.stdout.splitlines())
    assert set(right) >= {"task", "examples", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert (right["task"], right["examples"], completion["task"], completion["examples"]) == (
        "right",
        16,
        "completion",
        8,
    )
    assert set(completion) >= {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    model = analysis.load_model(tiny_run.out)
    expected = analysis.bits_per_byte(model, VERDICT, data_cache_dir=tiny_run.cache)
    assert corpus["bpb"] == pytest.approx(expected, rel=1e-9)
    text_bytes = len(VERDICT.read_text().encode())  # every target: the text after its first token, and the end-of-text
    first = len(get_tokenizer().decode_bytes(get_tokenizer().encode_ordinary(VERDICT.read_text())[:1]))
    assert corpus["bpb"] == pytest.approx(corpus["loss"] * corpus["tokens"] / ((text_bytes - first) * math.log(2)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 7}\n')
    assert_one_line_error(in_process(evaluate_main, ["--checkpoint", tiny_run.out, "--tasks", bad], capfd),
                          f"{bad} line 1: the right answer 7 is not an index of its 2 choices")  # fmt: skip
    assert_one_line_error(in_process(evaluate_main, ["--checkpoint", tiny_run.out], capfd), "pass --data PATH")


def test_eval_tasks_are_checked_before_any_work(tmp_path, train_here, task_files):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": -1}])
    assert_one_line_error(
        train_here("--eval_tasks", bad, "--output_dir", tmp_path / "r"), "line 1: the right answer -1"
    )
    assert not (tmp_path / "r").exists()
    assert_one_line_error(train_here("--eval_tasks", task_files["right"], "--eval_freq", "0"), "set eval_freq above 0")


# ----------------------------------------------------------------------------------------------- lm-eval
@pytest.mark.slow
def test_the_harness_and_lm_evals_hf_model_agree_with_the_evaluator(tiny_run, task_files, tmp_path, capfd):
    """On the tiny GPT-2 checkpoint exported to Hugging Face: lm-eval's own `hf` model, accel_gpt.harness and
    `evaluate --tasks` give the same per-example log-likelihoods (1e-4) and the same acc and acc_norm, on a
    HellaSwag-form file (through the harness's own hellaswag task config) and a completion file."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from accel_gpt import harness  # registers "accel_gpt"
    from accel_gpt.export import main as export_main
    from accel_gpt.tasks import loglikelihoods

    export = in_process(export_main, ["--checkpoint", tiny_run.out, "--out", tmp_path / "hf"], capfd)
    assert export.returncode == 0, export.stderr
    rng = random.Random(1)
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", [{
        "activity_label": "Story", "ctx_a": a, "ctx_b": "and then", "ctx": a + " and then", "label": str(i % 4),
        "endings": [b.strip()] + [c.strip() for _, c in rng.sample(SENTENCES, 3)],
    } for i, (a, b) in enumerate(SENTENCES)])  # fmt: skip
    configs = tmp_path / "task_configs"
    configs.mkdir()
    hellaswag_yaml = f"{lm_eval.__path__[0]}/tasks/hellaswag/hellaswag.yaml"
    (configs / "hs_local.yaml").write_text(
        f"include: {hellaswag_yaml}\ntask: hs_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {hellaswag}\ntraining_split: null\n"
        "validation_split: validation\n"
    )
    (configs / "completion_local.yaml").write_text(
        "task: completion_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task_files['completion']}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{continuation}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    manager = TaskManager(include_path=str(configs), include_defaults=False)  # indexing lm-eval's own takes long
    names = ["hs_local", "completion_local"]
    runs = {
        model: lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=names, task_manager=manager, log_samples=True, device="cpu"
        )  # fmt: skip
        for model, args in (
            ("hf", f"pretrained={tmp_path / 'hf'},dtype=float32"),
            ("accel_gpt", f"checkpoint={tiny_run.out},batch_size=3"),
        )  # fmt: skip
    }
    model, tokenizer = analysis.load_model(tiny_run.out), get_tokenizer()
    for name, path in (("hs_local", hellaswag), ("completion_local", task_files["completion"])):
        theirs, ours = (
            [[resp[0][0] for resp in sample["resps"]] for sample in runs[m]["samples"][name]]
            for m in ("hf", "accel_gpt")
        )
        task = load_task(str(path))
        mine = [
            [
                ll
                for ll, _ in loglikelihoods(
                    model, [encode_pair(tokenizer, ex.context, c, 50256) for c in ex.continuations]
                )
            ]
            for ex in task.examples
        ]
        assert [len(x) for x in theirs] == [len(x) for x in ours] == [len(x) for x in mine]
        for a, b, c in zip(theirs, ours, mine):
            assert a == pytest.approx(b, abs=1e-4) and a == pytest.approx(c, abs=1e-4)
        scores = evaluate_task(model, task, tokenizer, 50256)
        for metric in ("acc", "acc_norm"):
            if metric in scores:
                assert runs["hf"]["results"][name][f"{metric},none"] == runs["accel_gpt"]["results"][name][
                    f"{metric},none"] == scores[metric]  # fmt: skip
    # The command, and the two request kinds the tasks above do not use.
    results = tmp_path / "results.json"
    argv = ["--checkpoint", tiny_run.out, "--tasks", "completion_local", "--include_path", configs, "--output_path",
            results]  # fmt: skip
    assert in_process(harness.main, argv, capfd).returncode == 0
    assert json.loads(results.read_text())["results"]["completion_local"]["acc,none"] == scores["acc"]
    lm = harness.AccelGPT(checkpoint=str(tiny_run.out))
    prompt = "Every effort moves you"
    (text,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["\n"], "max_gen_toks": 12}))])
    assert text == analysis.generate(model, prompt, max_new_tokens=12)[len(prompt) :].split("\n")[0]
    (rolled,) = lm.loglikelihood_rolling([SimpleNamespace(args=(prompt,))])  # shorter than a window: one
    assert rolled == pytest.approx(
        loglikelihoods(model, [([50256], tokenizer.encode_ordinary(prompt))])[0][0], abs=1e-4
    )
