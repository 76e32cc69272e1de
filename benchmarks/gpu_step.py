"""Where a training step's time goes on one GPU, layer by layer, in one process:

    python benchmarks/gpu_step.py [--budget 420] [--out DIR] [--only PHASE ...]

- kernels: SDPA backends (flash, efficient, cuDNN) and training losses (plain, chunked, Liger's and Apple's fused
  linear cross-entropy when installed), forward + backward at gpt2-small's shapes;
- minimal loop: forward, loss, backward, fused AdamW on one fixed batch, nothing else, for (R) today's reference
  model path (vocabulary 50,257, plain loss, torch's attention order) and (A) the trainer's settings;
- trainer: `accel_gpt.train.train()` itself (data loader, host-to-device copies, accumulation context, clipping,
  non-finite check, reduce, metrics), its median step read from metrics.jsonl after warm-up;
- `--cuda_graph` (phases graph, small-graph): the whole step as one CUDA graph, its losses against the eager
  step's and a resume from its checkpoint; inductor's coordinate-descent tuning (small-coordinate-descent); the
  minimal loop and the trainer with `--bias false`, as nanoGPT's bench.py builds its model (small-nobias).

For gpt2-small (tied head, no qkv bias, dropout 0, 12 x 1024 tokens, bf16 autocast), compiled and eager, and
`mini`. Each phase is skipped once less than its cost of the `--budget` seconds is left, so a lease is never
overrun; results are printed as a table and written to DIR/gpu_step.json as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from accel_gpt.config import TrainConfig
from accel_gpt.metrics import flops_per_token, peak_flops
from accel_gpt.model import GPTModel, attention_backends, chunked_cross_entropy
from accel_gpt.optim import build_optimizer
from accel_gpt.train import train

SMALL = dict(model="gpt2-small", tie_weights=True, qkv_bias=False, dropout=0.0, batch_size=12, context_len=1024)
# nanoGPT's bench.py builds its model without biases (bias=False): this reads how much of a gap to its published
# figure is GPT-2's biases rather than the loop.
SMALL_NOBIAS = dict(SMALL, bias=False)
MINI = dict(model="mini", batch_size=8)
STARTED = time.perf_counter()
WORK = Path(tempfile.gettempdir()) / "gpu_step"  # run directories and the token cache: large, not results
RESULTS: list[dict] = []


def left(budget: float) -> float:
    return budget - (time.perf_counter() - STARTED)


def record(out: Path, **row) -> None:
    RESULTS.append(row)
    (out / "gpu_step.json").write_text(json.dumps(RESULTS, indent=1))
    print(json.dumps(row), flush=True)


def cuda_time(fn, steps: int, warmup: int, inner: int = 1) -> float:
    """Median milliseconds per call of `fn`, timed with CUDA events around `inner` back-to-back calls (so a
    short kernel's time is not its launch latency), `steps` times, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- kernels
def bench_attention(out: Path) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(12, 12, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    for name, backend in [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ]:

        def step():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        try:
            ms = cuda_time(step, 10, 5, inner=20)
        except RuntimeError as err:
            record(out, phase="attention", variant=name, error=str(err).splitlines()[0])
            continue
        flops = 4 * 12 * 12 * 1024 * 1024 * 64 * 3.5 / 2  # causal: half of fwd (2 matmuls) + bwd (5)
        record(out, phase="attention", variant=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))


def bench_losses(out: Path, compiled: bool) -> None:
    """Training loss forward + backward for 12 x 1024 tokens over a 768-wide, 50,304-row (padded) head."""
    tokens, dim, rows, vocabulary = 12 * 1024, 768, 50304, 50257
    hidden = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(rows, dim, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, vocabulary, (tokens,), device="cuda")

    def plain(h, w, t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = h @ w.T
        logits[:, vocabulary:] = float("-inf")
        return F.cross_entropy(logits.float(), t)

    def chunked(h, w, t):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in the model: fp32 weights under autocast
            return chunked_cross_entropy(h, w, t, 4096, vocabulary)

    variants = {"plain": plain, "chunked 4096": chunked}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # Liger cannot mask rows: give it the real vocabulary's rows (a contiguous view).
        variants["liger fused linear CE"] = lambda h, w, t: liger_fused_linear_cross_entropy(
            h, w[:vocabulary].bfloat16(), t
        )
    except ImportError as err:
        record(out, phase="loss", variant="liger", error=f"not installed ({err})")
    try:
        from cut_cross_entropy import linear_cross_entropy

        variants["cut cross-entropy"] = lambda h, w, t: linear_cross_entropy(h, w[:vocabulary].bfloat16(), t)
    except ImportError as err:
        record(out, phase="loss", variant="cce", error=f"not installed ({err})")
    reference = None
    for name, fn in variants.items():
        if compiled:
            if name.startswith("chunked"):
                continue  # a Python loop of in-place chunks: nothing for the compiler to fuse
            fn = torch.compile(fn)

        def step():
            fn(hidden, weight, targets).backward()

        try:
            loss = fn(hidden, weight, targets).item()
            ms = cuda_time(step, 20, 3)
        except Exception as err:  # an optional kernel that fails here is reported, not fatal
            record(out, phase="loss", variant=name, compiled=compiled, error=f"{type(err).__name__}: {err}"[:300])
            continue
        reference = reference if reference is not None else loss
        record(
            out,
            phase="loss",
            variant=name,
            compiled=compiled,
            ms=round(ms, 3),
            loss=round(loss, 5),
            loss_diff=abs(loss - reference),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )
        hidden.grad = weight.grad = None
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------- loops
def minimal_loop(
    out: Path,
    name: str,
    preset: dict,
    compiled: bool,
    vocab_multiple: int,
    attention: str,
    loss_chunk: int = 0,
    steps: int = 30,
    compile_mode: str | None = None,
) -> None:
    """Forward, loss, backward, fused AdamW on one fixed batch: nothing a trainer adds."""
    torch.cuda.empty_cache()  # the last variant's model is gone: give its memory back before measuring the peak
    torch.manual_seed(0)
    cfg = TrainConfig(**preset, vocab_multiple=vocab_multiple)
    model = GPTModel(cfg.model_config(50257)).cuda()
    model.loss_chunk = loss_chunk
    optimizer = build_optimizer(model, cfg)
    ctx = cfg.context_len or model.config.context_len
    x, y = (torch.randint(0, 50257, (cfg.batch_size, ctx), device="cuda") for _ in range(2))
    tokens = cfg.batch_size * ctx
    forward = torch.compile(model, mode=compile_mode) if compiled else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with attention_backends(attention):
        for _ in range(3):  # compilation and warm-up
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - started
        ms = cuda_time(step, steps, 2)
    flops = flops_per_token(model, ctx) * tokens
    record(
        out,
        phase="loop",
        variant=name,
        model=cfg.model,
        compiled=compiled,
        vocab_multiple=vocab_multiple,
        attention=attention,
        compile_mode=compile_mode,
        ms=round(ms, 2),
        tokens_per_sec=round(tokens / ms * 1000),
        mfu=round(flops / (ms / 1000) / peak_flops(torch.device("cuda"), "bf16", WORK), 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        warmup_s=round(warm, 1),
    )


def trainer(
    out: Path, name: str, preset: dict, compiled: bool, steps: int, run_dir: Path | None = None, **options
) -> dict[int, dict]:
    """The trainer's own loop, in this process, on the bundled Chinese corpus; median of the steady steps.
    Returns this run's records by step."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # each train() builds its own Accelerator
    GradientState._reset_state()
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    settings = dict(
        train_data_path="xiyouji",
        data_cache_dir=str(WORK / "cache"),
        output_dir=str(run_dir),
        max_steps=steps,
        warmup_steps=5,
        learning_rate=6e-4,
        min_lr=6e-5,
        eval_freq=0,
        save_freq=10**6,
        keep_last=1,
        compile=compiled,
    )
    cfg = TrainConfig(**preset, **(settings | options))
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r  # a resumed run's records follow the first run's: the last one counts
    steady = [r for s, r in records.items() if s > 20]
    ms = statistics.median(r["step_time"] for r in steady) * 1000
    record(
        out,
        phase="trainer",
        variant=name,
        model=cfg.model,
        compiled=compiled,
        ms=round(ms, 2),
        tokens_per_sec=round(statistics.median(r["tokens_per_sec"] for r in steady)),
        mfu=round(statistics.median(r["mfu"] for r in steady), 4),
        peak_gib=round(result["peak_memory_mib"] / 1024, 2),
        final_loss=round(result["loss"], 4),
        wall_s=round(wall, 1),
        **options,
    )
    return records


def cuda_graph_checks(out: Path) -> None:
    """`--cuda_graph` (the whole step as one CUDA graph) for mini: its speed against the trainer before this work
    and the eager step, its losses against the eager step's, and a resume from a graphed run's checkpoint."""
    trainer(out, "mini as before (log_every 1, no padding)", MINI, False, 200, log_every=1, vocab_multiple=1)
    eager = trainer(out, "mini eager", MINI, False, 200)
    graphed = trainer(out, "mini cuda_graph", MINI, False, 200, cuda_graph=True)
    trainer(out, "mini compiled + cuda_graph", MINI, True, 200, cuda_graph=True)
    # The graph reads its learning rate as fp32: updates differ from the eager step's in the last bits only.
    record(
        out,
        phase="graph",
        variant="mini losses: cuda_graph vs eager, 200 steps",
        max_loss_diff=max(abs(eager[s]["loss"] - graphed[s]["loss"]) for s in eager),
    )
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    first = trainer(
        out, "mini cuda_graph, 60 steps", MINI, False, 60, run_dir=run_dir, cuda_graph=True, save_freq=30, keep_last=0
    )
    resumed = trainer(
        out, "mini cuda_graph, resumed at 30", MINI, False, 60, run_dir=run_dir, cuda_graph=True, checkpoint="30"
    )
    record(
        out,
        phase="graph",
        variant="mini cuda_graph: resumed at step 30 vs uninterrupted, steps 31-60",
        max_loss_diff=max(abs(first[s]["loss"] - resumed[s]["loss"]) for s in range(31, 61)),
    )


def without_compile_caches() -> None:
    """Compile what follows from scratch: the caches key on the graph, not on the attention kernel chosen when it
    was traced, so a cuDNN variant after a flash one would silently reuse the flash kernels."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.reset()


def with_coordinate_descent_tuning(out: Path) -> None:
    """gpt2-small compiled with inductor's coordinate-descent tuning of kernel launch parameters (no CUDA graphs,
    unlike max-autotune): the minimal loop and the trainer, compiled afresh, then the setting restored."""
    import torch._dynamo
    import torch._inductor.config

    without_compile_caches()
    torch._inductor.config.coordinate_descent_tuning = True
    try:
        minimal_loop(out, "A compiled, coordinate-descent tuning", SMALL, True, 64, "auto")
        trainer(out, "B compiled, coordinate-descent tuning", SMALL, True, 60)
    finally:
        torch._inductor.config.coordinate_descent_tuning = False
        torch._dynamo.reset()


def profile_trainer(out: Path, name: str, preset: dict, steps: int, **options) -> None:
    """Where the host's time goes in the trainer's loop (a second, warm run under torch.profiler)."""
    trainer(out, name + " (warm-up)", preset, True, steps, **options)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        trainer(out, name + " (profiled)", preset, True, steps, **options)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    (out / f"profile-{name.replace(' ', '_')}.txt").write_text(table)
    print(table, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=420, help="seconds; phases that would overrun are skipped")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_step"))
    parser.add_argument("--only", nargs="*", help="run only these phases (by name)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # as accelerate_configs/gpu_1.yaml
    record(
        out,
        phase="device",
        variant=torch.cuda.get_device_name(),
        torch=torch.__version__,
        capability=list(torch.cuda.get_device_capability()),
    )

    phases = [  # (name, estimated seconds, call): in order of what matters most
        ("attention", 10, lambda: bench_attention(out)),
        ("loss-eager", 15, lambda: bench_losses(out, compiled=False)),
        (
            "small-eager",
            45,
            lambda: (minimal_loop(out, "A eager", SMALL, False, 64, "auto"), trainer(out, "B eager", SMALL, False, 40)),
        ),
        (
            "small-compiled",
            200,
            lambda: (
                minimal_loop(out, "R reference (50257, plain, torch attention)", SMALL, True, 1, "flash"),
                minimal_loop(out, "A compiled", SMALL, True, 64, "auto"),
                trainer(out, "B compiled", SMALL, True, 60),
            ),
        ),
        ("graph", 90, lambda: cuda_graph_checks(out)),
        ("small-graph", 60, lambda: trainer(out, "B compiled + cuda_graph", SMALL, True, 60, cuda_graph=True)),
        (
            "small-nobias",
            90,
            lambda: (
                minimal_loop(out, "A compiled, --bias false", SMALL_NOBIAS, True, 64, "auto"),
                trainer(out, "B compiled, --bias false", SMALL_NOBIAS, True, 60),
            ),
        ),
        (
            "small-compiled-cudnn",
            80,
            lambda: (
                without_compile_caches(),
                minimal_loop(out, "A compiled, cuDNN attention", SMALL, True, 64, "cudnn"),
                trainer(out, "B compiled, cuDNN attention", SMALL, True, 60, attention="cudnn"),
            ),
        ),
        # Compiling in this mode took 343 s on an H200: run it alone, with --budget 600.
        (
            "small-autotune",
            600,
            lambda: (
                without_compile_caches(),
                minimal_loop(out, "R reference (50257, plain, torch attention)", SMALL, True, 1, "flash"),
                minimal_loop(
                    out,
                    "A compiled, max-autotune-no-cudagraphs",
                    SMALL,
                    True,
                    64,
                    "auto",
                    compile_mode="max-autotune-no-cudagraphs",
                ),
                trainer(
                    out,
                    "B compiled, max-autotune-no-cudagraphs",
                    SMALL,
                    True,
                    60,
                    compile_mode="max-autotune-no-cudagraphs",
                ),
            ),
        ),
        (
            "mini",
            100,
            lambda: (
                minimal_loop(out, "mini loop eager", MINI, False, 64, "auto", steps=100),
                trainer(
                    out, "mini as before (log_every 1, no padding)", MINI, False, 200, log_every=1, vocab_multiple=1
                ),
                trainer(out, "mini eager", MINI, False, 200),
                trainer(out, "mini compiled", MINI, True, 200),
                trainer(out, "mini compiled reduce-overhead", MINI, True, 200, compile_mode="reduce-overhead"),
            ),
        ),
        (
            "profile-mini",
            40,
            lambda: profile_trainer(out, "mini reduce-overhead", MINI, 100, compile_mode="reduce-overhead"),
        ),
        ("loss-compiled", 45, lambda: bench_losses(out, compiled=True)),
        ("small-coordinate-descent", 240, lambda: with_coordinate_descent_tuning(out)),
        ("small-compiled-sync", 60, lambda: trainer(out, "B compiled, log_every 1", SMALL, True, 60, log_every=1)),
    ]
    for name, cost, call in phases:
        if args.only and name not in args.only:
            continue
        if left(args.budget) < cost:
            record(out, phase=name, skipped=f"{left(args.budget):.0f} s left, needs ~{cost}")
            continue
        started = time.perf_counter()
        try:
            call()
        except Exception as err:  # one broken phase must not cost the lease the others
            # With the chained errors: a failed CUDA-graph capture raises at its end, hiding the op that broke it.
            record(out, phase=name, error="".join(traceback.format_exception(err))[-3000:])
        print(f"# phase {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    print("\n| phase | variant | ms/step | tokens/s | MFU | peak GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in RESULTS:
        if "ms" in r and r["phase"] in ("loop", "trainer"):
            print(
                f"| {r['phase']} | {r['variant']} | {r['ms']} | {r['tokens_per_sec']:,} | {r['mfu']:.1%} | {r['peak_gib']} |"
            )


if __name__ == "__main__":
    main()
