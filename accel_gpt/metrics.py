"""What a run reports: `config.yaml`, `metrics.jsonl` (one JSON object per optimizer step), `samples.jsonl`, the
console, experiment trackers (through Accelerate), and the model-FLOPs utilisation (MFU) arithmetic.

Only the main process writes; every other rank gets a logger that does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from accel_gpt.errors import UserError
from accel_gpt.model import GPTModel

# Dense peak FLOP/s per GPU from the vendors' data sheets: (bf16/fp16 tensor cores, fp32 matmuls with TF32).
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),  # SXM
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62e12),
    "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12),
}


def flops_per_token(model: GPTModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus causal attention's
    12 * layers * dim * seq (the PaLM / nanoGPT estimate). Embedding lookups cost nothing; a tied head counts once."""
    cfg = model.config
    matmul_params = model.num_parameters(exclude_position_embeddings=True)
    if not cfg.tie_weights:
        matmul_params -= model.tok_emb.weight.numel()
    return 6 * matmul_params + 12 * cfg.num_layers * cfg.embedding_dim * seq_len


def measured_cpu_peak_flops(size: int = 1024, bursts: int = 12, seconds: float = 0.3) -> float:
    """What this process's threads reach on a large fp32 matmul: the honest ceiling for MFU on a CPU.

    The best of several short bursts, not one average: another process busy for a moment of start-up would
    otherwise halve the peak and put the run's MFU above 100%."""
    # Its own generator: dropout masks must not depend on whether the peak was measured or given (--peak_flops).
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    for _ in range(bursts):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            break
    return best


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this rank so far: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


CPU_PEAK_RECORD = "cpu-peak-flops.json"  # in the data cache directory: {"<processor> x<threads> threads": FLOP/s}


def best_cpu_peak_flops(record_dir: Path) -> float:
    """The CPU peak measured now, or the best measured before on this processor with as many threads, if higher.

    One start-up measurement can catch a shared VM slow for all of its 0.3 s: on the 2-core test VM the first 0.3 s
    of a process measured 93-164 GFLOP/s where 2 s reached 162-176, and a run logged MFU 109%. The best over runs
    converges on what the cores can do. The record is kept beside the token cache; failing to write it costs
    nothing but that memory."""
    key = f"{_processor_name()} x{torch.get_num_threads()} threads"
    path = record_dir / CPU_PEAK_RECORD
    try:
        record = json.loads(path.read_text())
        record = record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        record = {}
    earlier = record.get(key)
    earlier = float(earlier) if isinstance(earlier, (int, float)) else 0.0
    measured = measured_cpu_peak_flops()
    if measured > earlier:
        try:
            record_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({**record, key: measured}))
            os.replace(tmp, path)  # two ranks writing at once: one whole record wins
        except OSError:
            pass
    return max(measured, earlier)


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device, mixed_precision: str, record_dir: Path) -> float | None:
    """Per-device peak for MFU: the data-sheet figure for known GPUs, on CPU the best measurement (kept in
    `record_dir` across runs), else None."""
    if device.type == "cpu":
        return best_cpu_peak_flops(record_dir)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_FLOPS.items():
            # The model number must end where the key does: an L40 is not an L4, nor an RTX A1000 an A100.
            if re.search(re.escape(key) + "(?![0-9A-Za-z])", name):
                return half if mixed_precision in ("bf16", "fp16") else tf32
    return None


def resolve_trackers(report_to: str) -> list[str]:
    """`report_to` (none, all, or a comma-separated list) -> the Accelerate trackers to log with. Unknown or
    uninstalled trackers are a UserError here: Accelerate itself would skip an uninstalled one silently."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    installed = [tracker.value for tracker in get_available_trackers()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return installed
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(
                f"unknown tracker {name!r} in report_to; choose none, all, or from {', '.join(LOGGER_TYPE_TO_CLASS)}"
            )
        if name not in installed:
            raise UserError(f"tracker {name!r} is not installed here (pip install {name.replace('_', '-')})")
    return list(dict.fromkeys(names))


def tracking_options(report_to: str) -> dict:
    """Keyword arguments for `Accelerator(...)`: the trackers of `report_to` (nothing when it is none).

    Accelerate wants a logging directory up front for trackers that write files, but the run directory is
    decided after the Accelerator exists (rundir uses its collectives): RunLogger points it at
    `<run_dir>/trackers` before `init_trackers` (TensorBoard's event files: `<run_dir>/trackers/<project_name>/`)."""
    trackers = resolve_trackers(report_to)
    if not trackers:
        return {}
    return {"log_with": trackers, "project_config": ProjectConfiguration(logging_dir="trackers")}


def tracker_run_options(run_dir: Path, run_name: str, resumed_at: int) -> dict:
    """Per-tracker `init_kwargs`: the run's name, and for a resumed run the same tracker run where the tracker
    can continue one. TensorBoard writes into the same directory and hides the events of steps after the
    checkpoint (purge_step), which the resumed run logs again; W&B reopens the run whose id is derived from the
    run directory (steps it has already logged are ignored)."""
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    options = {
        "wandb": {"name": run_name, "id": run_id, "resume": "allow", "dir": str(run_dir)},
        "mlflow": {"run_name": run_name},
    }
    if resumed_at:
        options["tensorboard"] = {"purge_step": resumed_at + 1}
    return options


def open_on_a_new_line(path: Path):
    """`path` opened for appending lines, unbuffered (`append_whole` writes each record). A run killed mid-write
    leaves its last line torn: the next record must start a line of its own, or it is lost with the torn one."""
    file = open(path, "ab", buffering=0)
    size = os.fstat(file.fileno()).st_size
    if size:
        with open(path, "rb") as existing:
            existing.seek(-1, os.SEEK_END)
            if existing.read(1) != b"\n":
                append_whole(file, b"\n", path)
    return file


def append_whole(file, data: bytes, path: Path) -> None:
    """Append `data` whole or not at all: on a full disk or an I/O error the file is cut back to where it ended (no
    torn record mid-file), and the error is one UserError naming the file."""
    end = os.fstat(file.fileno()).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view) :]
    except OSError as err:
        with contextlib.suppress(OSError):
            os.ftruncate(file.fileno(), end)
        raise UserError(f"could not write {path}: {err.strerror or err}") from None


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        config: dict | None = None,
        accelerator: Accelerator | None = None,
    ):
        """`config`, the resolved configuration, goes to config.yaml and to the trackers as hyper-parameters;
        `accelerator` carries the trackers chosen by `tracking_options` (none: metrics.jsonl only)."""
        self.enabled, self.total_steps = enabled, total_steps
        self.error: str | None = None  # the first write that failed: nothing more is written, the loop stops on it
        if not enabled:
            return
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if config is not None:
                (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        except OSError as err:
            raise UserError(f"could not write {run_dir / 'config.yaml'}: {err.strerror or err}") from None
        self._accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if self._accelerator is not None:
            config = config or {}
            self._accelerator.project_configuration.logging_dir = str(run_dir / "trackers")
            options = tracker_run_options(run_dir, config.get("run_name") or run_dir.name, initial_step)
            self._accelerator.init_trackers(config.get("project_name", "accel_gpt"), config, options)
        # Appending keeps a resumed run's history in one file; for the steps from its checkpoint on, readers keep
        # what the resumed run logged (`analysis.load_run`).
        self._paths = {"metrics": run_dir / "metrics.jsonl", "samples": run_dir / "samples.jsonl"}
        try:
            self._files = {name: open_on_a_new_line(path) for name, path in self._paths.items()}
        except OSError as err:
            raise UserError(f"could not open {err.filename} to write: {err.strerror or err}") from None
        # The bar only makes sense on a terminal; logs and CI get the plain per-step lines alone.
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", disable=not sys.stderr.isatty())

    def info(self, message: str) -> None:
        if self.enabled:
            try:
                self._bar.write(message, file=sys.stdout)
                sys.stdout.flush()
            except BrokenPipeError:  # the reader of stdout went away (`| head`): the run's records are in its files
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.stderr.write("accel_gpt: stdout was closed; the run goes on, its records in metrics.jsonl\n")

    def _write(self, name: str, record: dict) -> bool:
        """Append a record to metrics.jsonl or samples.jsonl; False (and `error` set) once a write has failed."""
        if self.error is None:
            try:
                append_whole(
                    self._files[name], (json.dumps(record, ensure_ascii=False) + "\n").encode(), self._paths[name]
                )
            except UserError as err:
                self.error = str(err)
        return self.error is None

    def log_step(self, record: dict) -> None:
        if not self.enabled or not self._write("metrics", record):
            return
        if self._accelerator is not None:  # the same record, under the same step number
            try:
                self._accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except OSError as err:
                self.error = f"could not write the trackers' records: {err.strerror or err}"
                return
        line = (
            f"step {record['step']:>6}/{self.total_steps} | epoch {record['epoch']} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_sec']:,.0f} tok/s"
        )
        if "mfu" in record:
            line += f" | mfu {record['mfu']:.1%}"
        if "val_loss" in record:
            line += f" | train_loss {record['train_loss']:.4f} | val_loss {record['val_loss']:.4f}"
        if "val_bpb" in record:
            line += f" | val_bpb {record['val_bpb']:.4f}"
        for name, value in record.items():  # eval_tasks' scores ("<task>/acc", ...), a mixture's val_loss/<source>
            if "/" in name and not name.startswith("tokens_seen/"):
                line += f" | {name} {value:.4f}"
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        self.info(line)

    def log_sample(self, step: int, text: str) -> None:
        if self.enabled and self._write("samples", {"step": step, "text": text}):
            self.info(f"sample @ step {step}: {text!r}")

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            for file in self._files.values():
                file.close()


class StepWindow:
    """Steps whose loss and gradient norm are still on the device.

    Reading a value on the host makes the host wait for the GPU, which then idles while the next step is
    launched. So the values wait here and one transfer every `log_every` steps brings them all, exact, one record
    per step; the same collective says whether any rank was asked to stop. Step times are the window's mean."""

    def __init__(self, accelerator: Accelerator, tokens_per_step: int, step_flops: float, device_peak: float | None):
        self.accelerator, self.tokens_per_step = accelerator, tokens_per_step
        self.step_flops, self.device_peak = step_flops, device_peak
        self.records: list[dict] = []
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.restart_clock()

    def __len__(self) -> int:
        return len(self.records)

    def restart_clock(self) -> None:
        """Start timing from now: evaluation, samples and saves between windows are not step time."""
        self.started = time.perf_counter()

    def add(self, record: dict, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.records.append(record)
        self.losses.append(loss)
        self.norms.append(grad_norm)

    def flush(self, stop_requested: bool) -> tuple[list[dict], bool]:
        """The window's finished records, and whether any rank asked to stop."""
        accelerator, world_size, steps = self.accelerator, self.accelerator.num_processes, len(self.records)
        losses = torch.stack(self.losses)
        stop = torch.full((1,), float(stop_requested), device=losses.device)
        summed = accelerator.reduce(torch.cat([losses, stop]), reduction="sum")
        # The norm is taken after the gradient all-reduce, the same on every rank: no need to reduce it.
        values = torch.cat([summed, torch.stack(self.norms)]).tolist()  # the window's one host sync
        seconds = (time.perf_counter() - self.started) / steps
        memory = peak_memory_mib(accelerator.device)
        records, loss_sums, stops, norms = self.records, values[:steps], values[steps], values[steps + 1 :]
        for record, loss_sum, norm in zip(records, loss_sums, norms):
            record |= {
                "loss": loss_sum / world_size,
                "grad_norm": norm,
                "tokens_per_sec": self.tokens_per_step / seconds,
                "step_time": seconds,
                "peak_memory_mib": memory,
            }
            if self.device_peak:
                record["mfu"] = self.step_flops / seconds / (self.device_peak * world_size)
        self.records, self.losses, self.norms = [], [], []
        return records, stops > 0
