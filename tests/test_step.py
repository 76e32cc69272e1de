"""The CUDA-graph step against the eager step, on CPU: its body uncaptured, and its warm-up/capture/replay
sequence with stand-ins for CUDA's streams and graphs. A real capture needs a GPU (benchmarks/gpu_step.py's
`graph` phase)."""

import contextlib
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from accel_gpt.checkpoint import full_state_dicts, load_checkpoint, save_checkpoint
from accel_gpt.config import TrainConfig
from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.optim import build_optimizer
from accel_gpt.schedule import learning_rate_at
from accel_gpt.step import CudaGraphStep, EagerStep

MODEL = GPTConfig(vocabulary_size=97, context_len=16, embedding_dim=32, num_heads=2, num_layers=2, dropout=0.1)
STEPS, WARMUP, ACCUMULATION = 6, 2, 2


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_steps(accelerator, make, max_norm: float):
    """Per-step (loss, norm) and the final model of STEPS steps on fixed batches, warmup without clipping."""
    torch.manual_seed(0)
    model = GPTModel(MODEL)
    cfg = TrainConfig(weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg))
    data = torch.Generator().manual_seed(1)
    # Two global batches, taken in turn: different inputs at every step, and a loss that can go down.
    micro = [tuple(torch.randint(0, 97, (4, 16), generator=data) for _ in range(2)) for _ in range(2 * ACCUMULATION)]
    batches = iter(micro * (STEPS // 2))
    step = make(model, optimizer)
    torch.manual_seed(2)  # the same dropout masks for both
    results = []  # tensors, read at the end: a step that handed out its graph's own outputs would show here
    for i in range(STEPS):
        lr = learning_rate_at(
            i, total_steps=STEPS, warmup_steps=WARMUP, initial_lr=1e-4, learning_rate=1e-2, min_lr=1e-3
        )
        # The graph's learning rate is an fp32 tensor (what CUDA's fused AdamW reads): the one difference from a
        # Python float, in the last bits of the update. Rounded alike here, the steps must agree bit for bit.
        lr = torch.tensor(lr, dtype=torch.float32).item()
        results.append(step(batches, lr, math.inf if i < WARMUP else max_norm))
    return [(loss.item(), norm.item()) for loss, norm in results], model, optimizer


def test_graph_step_body_equals_the_eager_step(accelerator):
    """Tensor learning rate, direct backward/clip/fused AdamW with found_inf, inputs copied into fixed buffers:
    the same losses, norms, weights and optimizer state as Accelerate's step, bit for bit."""
    eager, eager_model, eager_opt = train_steps(
        accelerator, lambda m, o: EagerStep(m, o, accelerator, ACCUMULATION, TrainConfig()), max_norm=0.05
    )
    graph, graph_model, graph_opt = train_steps(
        accelerator, lambda m, o: CudaGraphStep(m, o, accelerator, ACCUMULATION, capture=False), max_norm=0.05
    )
    assert graph == eager
    assert all(norm > 0.05 for _, norm in eager[WARMUP:])  # clipping was active after warmup
    assert eager[-1][0] < eager[0][0]
    for (name, a), b in zip(eager_model.state_dict().items(), graph_model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(eager_opt.optimizer.state.values(), graph_opt.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


class FakeCapture:
    """Stands in for `torch.cuda.graph` and `CUDAGraph` on CPU. Capturing records the step without its effects,
    as a GPU records kernels without running them (weights, optimizer state and RNG are put back afterwards);
    each replay runs the captured step again and writes into the capture's output tensors, as a real replay
    overwrites them."""

    def __init__(self, monkeypatch):
        self.step: CudaGraphStep | None = None
        self.captured: list[float] = []
        self.replays = 0
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                loss, norm = fake.step._step(fake.step.graph_max_norm)
                fake.step.outputs[0].copy_(loss)
                fake.step.outputs[1].copy_(norm)

        class Stream:
            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", self.capture)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    def state(self) -> list[torch.Tensor]:
        optimizer = self.step.optimizer
        moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return [p.data for p in self.step.parameters] + moments

    @contextlib.contextmanager
    def capture(self, graph, stream=None):
        assert all(group["capturable"] for group in self.step.optimizer.param_groups)
        saved, rng = [t.clone() for t in self.state()], torch.get_rng_state()
        yield
        for tensor, value in zip(self.state(), saved):
            tensor.copy_(value)
        torch.set_rng_state(rng)
        self.captured.append(self.step.lr.item())


def test_graph_step_warms_up_captures_once_per_clipping_threshold_and_replays(accelerator, monkeypatch):
    eager, _, _ = train_steps(
        accelerator, lambda m, o: EagerStep(m, o, accelerator, ACCUMULATION, TrainConfig()), max_norm=0.05
    )
    fake = FakeCapture(monkeypatch)

    def make(model, optimizer):
        fake.step = CudaGraphStep(model, optimizer, accelerator, ACCUMULATION)
        return fake.step

    graph, _, optimizer = train_steps(accelerator, make, max_norm=0.05)
    assert graph == eager
    # Steps 0 and 2 (the first of the warmup and of the clipped steps) run uncaptured; 1 and 3 capture.
    assert len(fake.captured) == 2 and fake.replays == STEPS - 2
    assert fake.step.graph_max_norm == 0.05
    assert not any(group["capturable"] for group in optimizer.param_groups)


@pytest.mark.parametrize("kind", ["eager", "graph body"])
def test_a_non_finite_step_changes_no_weight_or_optimizer_state(accelerator, kind):
    torch.manual_seed(0)
    model = GPTModel(MODEL)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, TrainConfig()))
    if kind == "eager":
        step = EagerStep(model, optimizer, accelerator, ACCUMULATION, TrainConfig())
    else:
        step = CudaGraphStep(model, optimizer, accelerator, ACCUMULATION, capture=False)
    batch = (torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16)))
    step(iter([batch] * ACCUMULATION), 1e-3, 1.0)  # a good step: the optimizer has state
    with torch.no_grad():
        model.tok_emb.weight[batch[0][0, 0]] = float("nan")
    before = [t.clone() for t in model.parameters()]
    moments = [{k: v.clone() for k, v in s.items()} for s in optimizer.optimizer.state.values()]
    loss, norm = step(iter([batch] * ACCUMULATION), 1e-3, 1.0)
    assert math.isnan(loss.item()) and not math.isfinite(norm.item())
    for now, then in zip(model.parameters(), before):
        torch.testing.assert_close(now, then, rtol=0, atol=0, equal_nan=True)
    for now, then in zip(optimizer.optimizer.state.values(), moments):
        assert all(torch.equal(now[k], then[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_graph_step_checkpoint_stores_its_tensor_learning_rate_as_a_number(accelerator, tmp_path):
    results, model, optimizer = train_steps(
        accelerator, lambda m, o: CudaGraphStep(m, o, accelerator, ACCUMULATION, capture=False), max_norm=1.0
    )
    lr = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr)
    path = save_checkpoint(
        tmp_path, STEPS, MODEL, full_state_dicts(model, optimizer.optimizer), {"global_step": STEPS}, {}
    )
    fresh = GPTModel(MODEL)
    fresh_opt = build_optimizer(fresh, TrainConfig())
    load_checkpoint(path, fresh, fresh_opt)
    assert [g["lr"] for g in fresh_opt.param_groups] == [lr.item()] * 2
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
