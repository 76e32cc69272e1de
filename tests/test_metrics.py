"""The arithmetic behind throughput figures: the CPU peak that MFU is measured against."""

import json

import pytest
import torch

from accel_gpt import metrics


def test_cpu_peak_is_the_best_burst_so_a_busy_moment_cannot_halve_it(monkeypatch):
    """Start-up shares the CPU with something else for a moment: most bursts run at half speed, one does not.
    A single average would halve the peak and put MFU above 100%; the best burst does not."""
    durations = [0.02] * 5 + [0.01] + [0.02] * 6  # seconds per matmul burst: busy, one quiet, busy again
    clock = [0.0]  # the deadline is read first
    for i, d in enumerate(durations):
        clock += [i, i + d, i + d]  # each burst: start, end, deadline check
    readings = iter(clock)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(readings))
    peak = metrics.measured_cpu_peak_flops(size=64, bursts=len(durations), seconds=100.0)
    assert peak == pytest.approx(2 * 64**3 / 0.01)  # not the 0.02 s bursts, nor their mean


def test_measuring_the_cpu_peak_draws_nothing_from_the_training_rng():
    """The peak is measured after each rank's dropout stream is seeded: drawing from that stream would make the
    masks depend on whether --peak_flops was given."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    metrics.measured_cpu_peak_flops(size=32, bursts=2, seconds=0.01)
    assert torch.equal(torch.rand(4), expected)


def test_the_cpu_peak_is_the_best_measured_on_this_machine_so_far(tmp_path, monkeypatch):
    """A start-up measurement that catches a shared VM slow would put MFU above 100%: the best earlier
    measurement on the same processor and thread count stands in, and a better one replaces it."""
    measurements = iter([100e9, 40e9, 150e9])
    monkeypatch.setattr(metrics, "measured_cpu_peak_flops", lambda: next(measurements))
    assert metrics.peak_flops(torch.device("cpu"), "no", tmp_path) == 100e9
    assert metrics.peak_flops(torch.device("cpu"), "no", tmp_path) == 100e9  # a slow moment: the record stands
    assert metrics.peak_flops(torch.device("cpu"), "no", tmp_path) == 150e9
    [(key, value)] = json.loads((tmp_path / metrics.CPU_PEAK_RECORD).read_text()).items()
    assert value == 150e9 and key.endswith(f"x{torch.get_num_threads()} threads")
    (tmp_path / metrics.CPU_PEAK_RECORD).write_text("not json")  # a damaged record is measured over, not an error
    monkeypatch.setattr(metrics, "measured_cpu_peak_flops", lambda: 90e9)
    assert metrics.peak_flops(torch.device("cpu"), "no", tmp_path) == 90e9


@pytest.mark.parametrize(
    "name, bf16_peak",
    [
        ("NVIDIA L40", 181e12),  # not an L4 (121): MFU was 1.5x too high
        ("NVIDIA RTX A1000 6GB Laptop GPU", None),  # not an A100: unknown, so no MFU rather than a wrong one
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
    ],
)
def test_gpu_peak_is_looked_up_by_the_whole_model_name(monkeypatch, tmp_path, name, bf16_peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda"), "bf16", tmp_path) == bf16_peak
