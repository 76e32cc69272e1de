import math

import pytest

from accel_gpt.schedule import clips_gradients_at, learning_rate_at

KW = dict(total_steps=110, warmup_steps=10, initial_lr=1e-5, learning_rate=1e-3, min_lr=1e-4)


def test_linear_warmup_from_initial_to_peak():
    assert learning_rate_at(0, **KW) == pytest.approx(1e-5)
    assert learning_rate_at(5, **KW) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert learning_rate_at(10, **KW) == pytest.approx(1e-3)


def test_cosine_reaches_min_lr_at_last_step():
    assert learning_rate_at(109, **KW) == pytest.approx(1e-4)
    mid = 10 + (109 - 10) / 2
    assert learning_rate_at(int(mid), **KW) == pytest.approx(
        1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 99))
    )
    lrs = [learning_rate_at(s, **KW) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup


def test_clipping_only_after_warmup():
    assert not clips_gradients_at(9, 10)
    assert clips_gradients_at(10, 10)
    assert clips_gradients_at(0, 0)


@pytest.mark.parametrize("total, warmup", [(10, 9), (2, 1), (1, 0), (5, 0)])
def test_last_step_runs_at_min_lr_whatever_the_warmup(total, warmup):
    kw = dict(KW, total_steps=total, warmup_steps=warmup)
    assert learning_rate_at(total - 1, **kw) == pytest.approx(1e-4)
    if warmup:
        assert learning_rate_at(warmup - 1, **kw) < 1e-3  # still warming up the step before


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
@pytest.mark.parametrize("total, warmup, fraction", [(100, 10, 0.2), (10, 9, 0.5), (2, 1, 0.2), (50, 0, 1.0)])
def test_wsd_holds_the_peak_then_decays_to_min_lr_at_the_last_step(shape, total, warmup, fraction):
    kw = dict(total_steps=total, warmup_steps=warmup, initial_lr=0.0, learning_rate=1e-3, min_lr=1e-4)
    kw |= dict(schedule="wsd", decay_fraction=fraction, wsd_decay=shape)
    lrs = [learning_rate_at(s, **kw) for s in range(total)]
    assert lrs[-1] == pytest.approx(1e-4)
    after_warmup = lrs[warmup:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))  # never rises after warmup
    decaying = sum(lr < 1e-3 for lr in after_warmup)
    # The last decay_fraction of the run, from the peak (never inside the warmup); the last step at least.
    assert decaying == min(max(1, round(fraction * total)), max(1, len(after_warmup) - 1))
    if total == 100:
        assert lrs[10:80] == [1e-3] * 70
        mid = learning_rate_at(89, **kw)  # halfway down (79 is the last step at the peak, 99 the first at min_lr)
        if shape == "linear":
            assert mid == pytest.approx(1e-4 + 0.5 * 9e-4)
        else:  # 1 - sqrt(0.5): past half the way down
            assert mid == pytest.approx(1e-4 + (1 - 0.5**0.5) * 9e-4)
