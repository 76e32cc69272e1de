"""The CUDA-graph step's body against the eager step, on CPU: the capture itself needs a GPU
(benchmarks/gpu_step.py's `graph` phase runs it there); everything it captures is checked here."""

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from accel_gpt.checkpoint import full_state_dicts, load_checkpoint, save_checkpoint
from accel_gpt.config import TrainConfig
from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.schedule import learning_rate_at
from accel_gpt.step import CudaGraphStep, EagerStep
from accel_gpt.train import build_optimizer

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
    results = []
    for i in range(STEPS):
        lr = learning_rate_at(i, total_steps=STEPS, warmup_steps=WARMUP, initial_lr=1e-4, learning_rate=1e-2, min_lr=1e-3)
        # The graph's learning rate is an fp32 tensor (what CUDA's fused AdamW reads): the one difference from a
        # Python float, in the last bits of the update. Rounded alike here, the steps must agree bit for bit.
        lr = torch.tensor(lr, dtype=torch.float32).item()
        loss, norm = step(batches, lr, math.inf if i < WARMUP else max_norm)
        results.append((loss.item(), norm.item()))
    return results, model, optimizer


def test_graph_step_body_equals_the_eager_step(accelerator):
    """Tensor learning rate, direct backward/clip/fused AdamW with found_inf, inputs copied into fixed buffers:
    the same losses, norms, weights and optimizer state as Accelerate's step, bit for bit."""
    eager, eager_model, eager_opt = train_steps(
        accelerator, lambda m, o: EagerStep(m, o, accelerator, ACCUMULATION, TrainConfig()), max_norm=0.05)
    graph, graph_model, graph_opt = train_steps(
        accelerator, lambda m, o: CudaGraphStep(m, o, accelerator, ACCUMULATION, capture=False), max_norm=0.05)
    assert graph == eager
    assert all(norm > 0.05 for _, norm in eager[WARMUP:])  # clipping was active after warmup
    assert eager[-1][0] < eager[0][0]
    for (name, a), b in zip(eager_model.state_dict().items(), graph_model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(eager_opt.optimizer.state.values(), graph_opt.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_graph_step_checkpoint_stores_its_tensor_learning_rate_as_a_number(accelerator, tmp_path):
    results, model, optimizer = train_steps(
        accelerator, lambda m, o: CudaGraphStep(m, o, accelerator, ACCUMULATION, capture=False), max_norm=1.0)
    lr = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr)
    path = save_checkpoint(tmp_path, STEPS, MODEL, full_state_dicts(model, optimizer.optimizer), {"global_step": STEPS}, {})
    fresh = GPTModel(MODEL)
    fresh_opt = build_optimizer(fresh, TrainConfig())
    load_checkpoint(path, fresh, fresh_opt)
    assert [g["lr"] for g in fresh_opt.param_groups] == [lr.item()] * 2
    assert not any(g["capturable"] for g in fresh_opt.param_groups)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
