"""One optimizer step: forward and backward over the accumulation micro-batches, clipping, the update.

`EagerStep` launches it kernel by kernel through Accelerate; `CudaGraphStep` captures it once as a CUDA graph and
replays it, for small models on one GPU, whose steps are bound by the host launching those kernels.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from accel_gpt.config import CUDAGRAPH_COMPILE_MODES, TrainConfig
from accel_gpt.errors import UserError


def optimizer_step(
    model, optimizer, batches, accelerator: Accelerator, accumulation: int, max_norm: float, cuda_graphs: bool = False
):
    """Forward/backward over `accumulation` micro-batches, then one update unless the gradient norm is not finite.

    Returns (this rank's mean loss, gradient norm) as device tensors: nothing here waits for the device. The
    norm is taken after the all-reduce, so every rank makes the same skip decision."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accumulation):
        inputs, targets = next(batches)
        if cuda_graphs:  # a new iteration: the graphs may reuse the memory of the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.accumulate(model):  # gradient all-reduce only on the last micro-batch
            loss = model(inputs, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                if isinstance(grad_norm, DTensor):  # FSDP: a replicated norm; the optimizer wants a plain tensor
                    grad_norm = grad_norm.full_tensor()
                skip_if_not_finite(optimizer.optimizer, grad_norm)
                update(optimizer)
        loss_sum += loss.detach()
    return loss_sum / accumulation, grad_norm.detach().float()


def update(optimizer: AcceleratedOptimizer) -> None:
    """The update and zeroing of the gradients, at the last micro-batch.

    Without a loss scaler, Accelerate's wrapper does nothing here but call torch's optimizer, at 0.17 ms more host
    time per update on our CPU (benchmarks/host_overhead.py; accelerate 1.15 looks for the lomo_optim package on
    disk twice a step and inspects zero_grad's signature each call): time that a small model's step on a GPU
    waits for. fp16's loss scaler stays Accelerate's."""
    stepper = optimizer.optimizer if optimizer.scaler is None else optimizer
    stepper.step()
    stepper.zero_grad(set_to_none=True)


def skip_if_not_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """Have fused AdamW skip its next update when the gradient norm is not finite, decided on the device: no
    host sync, and the same decision on every rank (the norm is taken after the all-reduce)."""
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()


class EagerStep:
    """`optimizer_step` at the learning rate of each call."""

    def __init__(self, model, optimizer, accelerator: Accelerator, accumulation: int, cfg: TrainConfig):
        self.model, self.optimizer, self.accelerator, self.accumulation = model, optimizer, accelerator, accumulation
        # compile's own CUDA graphs (cudagraph trees) need to be told where an iteration starts
        self.cudagraph_trees = cfg.compile and cfg.compile_mode in CUDAGRAPH_COMPILE_MODES

    def __call__(self, batches, lr: float, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices: their own peak, the same schedule
        return optimizer_step(
            self.model, self.optimizer, batches, self.accelerator, self.accumulation, max_norm, self.cudagraph_trees
        )


def check_cuda_graph(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse `cuda_graph` where the step cannot be captured, before any work."""
    if not cfg.cuda_graph:
        return
    if accelerator.device.type != "cuda":
        raise UserError(f"cuda_graph needs a CUDA GPU; this run is on {accelerator.device.type}")
    if accelerator.distributed_type != DistributedType.NO:
        raise UserError(
            f"cuda_graph runs one process on one GPU; this launch is {accelerator.distributed_type.value} "
            f"with {accelerator.num_processes} processes (their collectives are not captured)"
        )
    if accelerator.mixed_precision == "fp16":
        raise UserError(
            "cuda_graph cannot capture fp16's loss scaling, decided on the host: use bf16 or no mixed precision"
        )


class CudaGraphStep:
    """The step captured as one CUDA graph and replayed: per step the host copies the batch into the graph's
    input buffers, writes the learning rate into a device tensor and launches the graph.

    A graph replays fixed kernels on fixed memory, so the step here has no host syncs (the non-finite skip is
    decided on the device by fused AdamW's `found_inf`), no Python choices that change between steps, and none of
    Accelerate's accumulation bookkeeping (which counts micro-batches on the host and would be frozen in the
    graph): one process, no loss scale, so backward of loss / accumulation is all `accelerator.backward` does.
    torch's clipping takes its threshold as a Python number, so the warmup (no clipping) and the rest of the run
    get a graph each. Before each capture one step runs uncaptured on the capture stream, which creates the
    optimizer's state, compiles, and sets up libraries' per-stream handles outside the graph.

    The learning rate is read as fp32 (what CUDA's fused AdamW takes from a tensor), so updates differ from the
    eager step's in their last bits. `capture=False` runs the same step uncaptured: what tests on machines
    without a GPU compare with `EagerStep`."""

    def __init__(self, model, optimizer, accelerator: Accelerator, accumulation: int, capture: bool = True):
        self.model, self.accumulation, self.capture = model, accumulation, capture
        self.optimizer = optimizer.optimizer  # torch's own: Accelerate's wrapper counts micro-batches on the host
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.lr = torch.zeros((), device=accelerator.device)  # fused AdamW reads a tensor learning rate on the device
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.inputs = self.targets = None  # [accumulation, batch, seq] on the device, allocated by the first batch
        self.stream = torch.cuda.Stream() if capture else None
        self.graph, self.graph_max_norm, self.outputs = None, None, None
        self.warmed: set[float] = set()  # max_norm values that have run uncaptured once

    def __call__(self, batches, lr: float, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.lr.fill_(lr)
        self._load([next(batches) for _ in range(self.accumulation)])
        if not self.capture:
            return self._step(max_norm)
        if self.graph is None or self.graph_max_norm != max_norm:
            if max_norm not in self.warmed:
                self.warmed.add(max_norm)
                return self._on_capture_stream(max_norm)
            self._capture(max_norm)
        self.graph.replay()
        return self.outputs[0].clone(), self.outputs[1].clone()  # the next replay overwrites the graph's outputs

    def _load(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self.inputs is None:
            self.inputs = torch.stack([inputs for inputs, _ in micro_batches])
            self.targets = torch.stack([targets for _, targets in micro_batches])
            return
        for i, (inputs, targets) in enumerate(micro_batches):
            self.inputs[i].copy_(inputs)
            self.targets[i].copy_(targets)

    def _capture(self, max_norm: float) -> None:
        self.graph = self.outputs = None  # the warmup's graph: its memory goes back before the next capture
        graph = torch.cuda.CUDAGraph()
        # Fused AdamW runs the same kernel either way; the flag only lets it be captured (and, left on, it would
        # warn that the uncaptured warm-up steps are not).
        groups = self.optimizer.param_groups
        for group in groups:
            group["capturable"] = True
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                outputs = self._step(max_norm)
        finally:
            for group in groups:
                group["capturable"] = False
        self.graph, self.outputs, self.graph_max_norm = graph, outputs, max_norm

    def _on_capture_stream(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss, grad_norm = self._step(max_norm)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss.clone(), grad_norm.clone()

    def _step(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros((), device=self.lr.device)
        for inputs, targets in zip(self.inputs, self.targets):
            loss = self.model(inputs, targets)
            (loss / self.accumulation).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        skip_if_not_finite(self.optimizer, grad_norm)
        self.optimizer.step()
        # Inside a capture this only drops the host's references: each replay's first backward writes the
        # gradients afresh into the graph's memory, as it did when captured.
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accumulation, grad_norm.detach().float()


def make_step(cfg: TrainConfig, model, optimizer, accelerator: Accelerator, accumulation: int):
    """The step `cfg` asks for, as a callable (batches, lr, max_norm) -> (mean loss, gradient norm)."""
    if cfg.cuda_graph:
        return CudaGraphStep(model, optimizer, accelerator, accumulation)
    return EagerStep(model, optimizer, accelerator, accumulation, cfg)
