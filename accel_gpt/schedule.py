"""The learning-rate schedule as one pure function of the optimizer step.

Linear warmup from `initial_lr` to the peak `learning_rate`, then a cosine decay that reaches `min_lr` at the last step.
"""

from __future__ import annotations

import math


def learning_rate_at(
    step: int, *, total_steps: int, warmup_steps: int, initial_lr: float, learning_rate: float, min_lr: float
) -> float:
    """LR for 0-based optimizer step `step` of a run of `total_steps` steps."""
    if step < warmup_steps:
        return initial_lr + (learning_rate - initial_lr) * step / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:  # warmup ends at the last step, which still gets min_lr
        return min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clips_gradients_at(step: int, warmup_steps: int) -> bool:
    """Gradient clipping starts once warmup is over, as in the original loop."""
    return step >= warmup_steps
