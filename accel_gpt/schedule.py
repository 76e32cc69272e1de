"""The learning-rate schedule as one pure function of the optimizer step.

Linear warmup from `initial_lr` to the peak `learning_rate`, then either a cosine decay that reaches `min_lr` at
the last step, or warmup-stable-decay: the peak held until the last `decay_fraction` of the run, then a linear or
1-sqrt decay that reaches `min_lr` at the last step.
"""

from __future__ import annotations

import math


def learning_rate_at(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    initial_lr: float,
    learning_rate: float,
    min_lr: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
    wsd_decay: str = "linear",
) -> float:
    """LR for 0-based optimizer step `step` of a run of `total_steps` steps."""
    if step < warmup_steps:
        return initial_lr + (learning_rate - initial_lr) * step / warmup_steps
    last = total_steps - 1
    if schedule == "wsd":
        # The decay's first step is the last one at the peak; it never starts inside the warmup.
        decay_start = max(warmup_steps, last - max(1, round(decay_fraction * total_steps)))
        if step >= last:  # also when warmup ends at the last step: it still gets min_lr
            return min_lr
        if step <= decay_start:
            return learning_rate
        progress = (step - decay_start) / (last - decay_start)
        remaining = 1.0 - progress if wsd_decay == "linear" else 1.0 - math.sqrt(progress)
        return min_lr + (learning_rate - min_lr) * remaining
    decay_steps = last - warmup_steps
    if decay_steps <= 0:  # warmup ends at the last step, which still gets min_lr
        return min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clips_gradients_at(step: int, warmup_steps: int) -> bool:
    """Gradient clipping starts once warmup is over, as in the original loop."""
    return step >= warmup_steps
