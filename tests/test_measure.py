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


def test_flops_are_counted_only_when_asked_and_count_a_linear_layer_exactly():
    layer = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(5, 32, requires_grad=True)
    with measure(count_flops=True) as counted:
        layer(x).sum().backward()
    assert counted.flops == 3 * 2 * 5 * 32 * 8  # forward, grad of input, grad of weight
    with measure() as plain:
        layer(x).sum().backward()
    assert plain.flops == 0


def test_a_full_fine_tuning_round_costs_three_forward_passes_a_step(tmp_path):
    """Backward of every matmul is twice its forward, so a client of `full` whose steps are
    whole batches spends 3x the forward FLOPs a step; lines and summary average what clients
    counted."""
    import statistics

    from fedft.federation.engine import build_task, run_federation
    from fedft.metrics import rundir

    from helpers import tiny_config

    sets = {"federation.count_flops": True, "federation.rounds": 2, "train.max_steps": 2}
    task = build_task(tiny_config(tmp_path, "full", **sets))
    size = task.cfg.train.batch_size
    whole = [c for c, split in enumerate(task.data.clients) if len(split.train) >= 2 * size]
    assert whole
    with measure(count_flops=True) as forward:
        task.model(task.data.train.batch(task.data.clients[whole[0]].train[:size]))
    run_dir = tmp_path / "run"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    lines = rundir.read_metrics(run_dir)
    checked = 0
    for line in lines:
        flops = [c["flops"] for c in line["per_client"]]
        assert line["client_flops_mean"] == statistics.mean(flops)
        for c in line["per_client"]:
            if c["client"] in whole:
                assert c["flops"] == 3 * forward.flops * 2
                checked += 1
    assert checked
    assert summary["client_flops_per_round"] == statistics.mean(
        line["client_flops_mean"] for line in lines
    )


def test_flops_are_not_counted_under_dp(tmp_path):
    """A DP client's FLOPs would count the rows of its Poisson batches, which DP keeps secret."""
    import pytest

    from fedft.errors import ConfigError
    from fedft.federation.engine import build_task

    from helpers import tiny_config

    sets = {"federation.count_flops": True, "privacy.mode": "sample", "privacy.epsilon": 8}
    with pytest.raises(ConfigError, match="count them in a run without DP"):
        build_task(tiny_config(tmp_path, "lora", **sets))
