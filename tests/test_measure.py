import time

import torch

from fedft.federation.payload import Payload
from fedft.metrics import measure as measure_module
from fedft.metrics.measure import measure


def test_payload_bytes_come_from_the_tensors_and_scalars():
    p = Payload(
        {"a": torch.zeros(10, 3), "b": torch.zeros(4, dtype=torch.float16)},
        {"n": 5, "loss": 0.1, "tag": "abc"},
    )
    assert p.tensor_bytes == 10 * 3 * 4 + 4 * 2
    assert p.scalar_bytes == 8 + 8 + 3
    assert p.nbytes == p.tensor_bytes + p.scalar_bytes


def test_peak_memory_is_per_measurement_not_lifetime():
    with measure() as big:
        block = torch.ones(300 * 1024 * 1024 // 4)  # 300 MB, touched
        del block
    with measure() as small:
        torch.ones(10)
    assert big.peak_rss_bytes - small.peak_rss_bytes > 250 * 1024 * 1024
    assert big.seconds > 0


def test_where_the_high_water_mark_cannot_be_reset_a_sampler_measures(monkeypatch):
    monkeypatch.setattr(measure_module, "_reset_hwm", lambda: False)
    with measure() as big:
        block = torch.ones(300 * 1024 * 1024 // 4)  # 300 MB, touched
        time.sleep(0.05)  # the sampler looks every 5 ms
        del block
    with measure() as small:
        torch.ones(10)
    assert big.peak_rss_bytes - small.peak_rss_bytes > 250 * 1024 * 1024
