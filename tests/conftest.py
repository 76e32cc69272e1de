"""Shared helpers and fixtures: the real trainer through `accelerate launch` or `python -m`, command lines run
in-process, free ports, and finished runs built once per session that tests only read (a test that changes a
run copies it first, with `copy_run`). See tests/README.md for which file tests what."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psutil
import pytest

# Tests never touch the network: transformers and datasets work from local files only, and datasets prepares
# what it loads in a cache of this session's own (set before anything imports datasets, which reads it then).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="accel-gpt-tests-hf-datasets-"))

# A suite started in the background by a shell without job control (`pytest &` in a script, a CI step run so)
# inherits SIGINT ignored, and so would every process the tests start, where Python then leaves it ignored: the tests
# that interrupt a command, or check that train() leaves Python's Ctrl-C handler in place, need it as a terminal
# gives it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# One thread per process: the suite runs a worker per core (pytest-xdist), and more threads than cores oversubscribe,
# which slows torch's kernels far more than it parallelises them. Processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# And one thread per training process: the trainer's default, a thread per core, puts two or three threads on each
# core while the other xdist worker runs, and OpenMP threads that wait for a descheduled partner cost the suite a
# sixth of its time (benchmarks/RESULTS.md, "The test suite's threads"). The helpers below add --cpu_threads 1 to
# every trainer they start, in this process or another, unless a test gives its own.
TRAINER_THREADS = ["--cpu_threads", "1"]


def one_thread(args) -> list[str]:
    args = [str(a) for a in args]
    return args if "--cpu_threads" in args else [*args, *TRAINER_THREADS]


REPO = Path(__file__).resolve().parents[1]
VERDICT = Path(str(resources.files("accel_gpt") / "assets" / "the-verdict.txt"))


_PORTS = None  # this worker's ports not yet handed out


def free_port() -> int:
    """A TCP port nothing listens on now, for a launch's rendezvous: launches never share the default 29500, so tests
    run side by side. Not one the kernel hands out (an ephemeral port, in 32768-60999): between this call and the
    launcher binding it seconds later, any process's outgoing connection could take one of those, and another xdist
    worker asking the kernel could be given the same one, a rendezvous of two tests that hangs. Each worker has its
    own slice of 20000-32767 and walks it, so no two launches of a session share a port."""
    global _PORTS
    if _PORTS is None:
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        size = (32768 - 20000) // workers
        _PORTS = iter(range(20000 + worker * size, 20000 + (worker + 1) * size))
    for port in _PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # another program's
                continue
            return port
    raise RuntimeError("no free port left in this worker's slice")


def common_args(out, cache) -> list[str]:
    """A tiny model on The Verdict: 10 steps that cross into a second epoch, evaluated and saved at 5 and 10."""
    return [
        "--model", "tiny", "--train_data_path", str(VERDICT), "--data_cache_dir", str(cache),
        "--output_dir", str(out), "--max_steps", "10", "--eval_freq", "5", "--save_freq", "5", "--eval_iter", "2",
        "--learning_rate", "1.5e-3", "--warmup_steps", "2", "--dropout", "0.0", "--seed", "11",
        "--val_fraction", "0.6",  # 32 training windows = 8 steps of 4: the 10 steps cross into epoch 1
        "--peak_flops", "1e11",  # for MFU: measuring the CPU's peak costs each process 0.3 s (test_metrics.py tests it)
        *TRAINER_THREADS,
    ]  # fmt: skip


RECIPE = [  # every modern option at once: Muon and the model options of the fast recipe
    "--optimizer", "muon", "--muon_learning_rate", "0.004", "--learning_rate", "0.003", "--lr_schedule", "wsd",
    "--position", "rotary", "--norm", "rmsnorm", "--qk_norm", "true", "--activation", "relu2",
    "--zero_init_projections", "true", "--logit_softcap", "15",
]  # fmt: skip


def read_metrics(run_dir) -> dict[int, dict]:
    """metrics.jsonl by step; a resumed run appends, and the latest record of a step wins."""
    import json

    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def launch_command(num_processes: int = 1, config: str | None = None, launcher_args=(), module="train") -> list[str]:
    """`accelerate launch` of `accel_gpt.<module>` with 1 CPU process or 2 gloo processes (or `config`), on a free
    port."""
    config = config or {1: "cpu_1proc.yaml", 2: "cpu_2proc_gloo.yaml"}[num_processes]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
    ]
    if "--main_process_port" not in launcher_args:
        cmd += ["--main_process_port", str(free_port())]
    return cmd + list(launcher_args) + ["-m", f"accel_gpt.{module}"]


def launch_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def launch(
    args: list[str], num_processes: int, timeout: int = 300, config: str | None = None, launcher_args=()
) -> subprocess.CompletedProcess:
    """Run the real trainer through `accelerate launch` and require it to succeed."""
    cmd = launch_command(num_processes, config, launcher_args) + one_thread(args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=launch_env(), cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_module(module: str, *args, stdin: str | None = None, timeout: int = 300, prefix=()):
    """`python -m accel_gpt.<module> ARGS` in a fresh process, as a user types it."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", f"accel_gpt.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def train_cli(*args, timeout: int = 300, prefix=()):
    return run_module("train", *one_thread(args), timeout=timeout, prefix=prefix)


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(args, num_processes, env_extra=None):
    """Start the trainer (through `accelerate launch` for 2 processes) in its own process group."""
    prefix = [sys.executable, "-m", "accel_gpt.train"] if num_processes == 1 else launch_command(2)
    return subprocess.Popen(
        [*prefix, *one_thread(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=launch_env(**(env_extra or {})), cwd=REPO, start_new_session=True,
    )  # fmt: skip


def kill_all(proc):
    """SIGKILL the launcher and every worker (torchrun puts workers in sessions of their own)."""
    family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@dataclass
class Ran:
    """What a command line run in-process returned: the fields of a CompletedProcess that the tests read."""

    returncode: int
    stdout: str
    stderr: str


def in_process(main, argv, capfd) -> Ran:
    """Run a command's `main(argv)` in this process as its `python -m` entry point does (through `run_command`):
    the same error contract as a subprocess (exit 2 and one `accel_gpt: error:` line, read at the file-descriptor
    level) without paying for a Python start."""
    from accel_gpt.cli import run_command

    capfd.readouterr()
    try:
        run_command(lambda: main([str(a) for a in argv]))
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out, err = capfd.readouterr()
    return Ran(code, out, err)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("accel_gpt: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_only_line_error(result, *fragments):
    """Bad input data: the error line is all there is on stderr (no progress bars or library log lines first)."""
    assert_one_line_error(result, *fragments)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


def without_read_override(probe) -> list[str]:
    """A command prefix under which file permissions apply: root ignores them, so drop the capabilities that let it
    (setpriv from util-linux). `probe` is a file with mode 000 that must then be unreadable."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        denied = subprocess.run([*prefix, "cat", str(probe)], capture_output=True, timeout=30).returncode != 0
    except FileNotFoundError:
        denied = False
    if not denied:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no setpriv): permissions would not apply")
    return prefix


@dataclass
class FinishedRun:
    out: Path  # the run directory
    cache: Path  # its token cache
    root: Path  # the folder holding both


def copy_run(run: FinishedRun, dest: Path) -> Path:
    """A copy of a shared run's directory, for a test that writes into it."""
    shutil.copytree(run.out, dest)
    return dest


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    """One token cache for the session's shared runs: The Verdict is tokenized once."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_root) -> FinishedRun:
    """A finished 4-step run of the train command: evaluations at 2 and 4, checkpoints at 2 and 4.
    Read-only: copy it (`copy_run`) to change it."""
    root = tmp_path_factory.mktemp("tiny-run")
    from accel_gpt.config import parse_config
    from accel_gpt.train import train

    args = common_args(root / "run", cache_root) + ["--max_steps", "4", "--save_freq", "2", "--eval_freq", "2"]
    train(parse_config(one_thread(args)))  # in this process: a Python start costs more than the run
    return FinishedRun(root / "run", cache_root, root)


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Path:
    """A 600-id byte-level BPE (`python -m accel_gpt.tokenizer train`) trained on The Verdict and the start of Tiny
    Shakespeare, with GPT-2's split pattern: a tokenizer folder. Read-only."""
    from accel_gpt.tokenizer.__main__ import main

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = root / "corpus.txt"
    shakespeare = resources.files("accel_gpt") / "assets" / "tinyshakespeare.txt"
    corpus.write_text(VERDICT.read_text() + shakespeare.read_text()[:30_000])
    main(["train", "--data", str(corpus), "--vocab_size", "600", "--out", str(root / "bpe")])
    return root / "bpe"


@pytest.fixture
def train_here(capfd):
    """`python -m accel_gpt.train ARGS` run in this process, as train.main: the same exit status and output,
    without a Python start. Cases that need a process of their own (signals, dropped capabilities, imports,
    concurrency, the launcher) use train_cli or launch."""
    from accel_gpt.train import main

    return lambda *args: in_process(main, one_thread(args), capfd)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


# The files that take longest, first: pytest-xdist hands each worker one file at a time (--dist loadfile), so
# the long ones then run side by side instead of one of them alone at the end while the other core idles.
# Measured with `--durations=0` (the sum of each file's tests), longest first.
LONGEST_FIRST = ("test_launch.py", "test_faults.py", "test_streaming.py", "test_optim.py", "test_mixture.py",
                 "test_rundir.py", "test_cache.py", "test_analysis.py", "test_trackers.py", "test_documents.py",
                 "test_sample_evaluate.py", "test_hf.py", "test_tasks.py", "test_tokenizer.py", "test_errors.py",
                 "test_data_layouts.py", "test_saved_datasets.py", "test_notebook.py", "test_train.py",
                 "test_batches.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A trainer run in this process sets torch's threads for it: the next test starts with one again."""
    yield
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
