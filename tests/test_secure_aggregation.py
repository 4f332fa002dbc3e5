"""Secure aggregation (Flower's SecAgg+ workflow and client mod) on three real SuperNodes on
127.0.0.1: the global state equals the plain FedAvg run's within SecAgg+'s quantization, the
protocol's bytes are counted, and what it cannot serve is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedft.cli import main as cli_main
from fedft.config import build_config
from fedft.errors import ConfigError
from fedft.federation.engine import build_task, make_server
from fedft.federation.loopback import Federation
from fedft.metrics import rundir

from helpers import TINY_CLI, local_run, sets_string, tiny_config

BASE = {
    "model.name": "tiny-bert",
    "model.max_length": 16,
    "data.max_train_samples": 240,
    "data.max_test_samples": 60,
    "federation.clients": 3,
    "federation.rounds": 1,
    "federation.sample_fraction": 1.0,
    "train.max_steps": 2,
}
SECURE = {
    "federation.secure_aggregation": True,
    "federation.secagg_clip_range": 1.0,
    "federation.secagg_max_weight": 100,  # each node holds about 65 training rows
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("secagg"))
    try:
        fed.start_superlink()
        for i in range(3):
            fed.start_supernode(f"node{i}", f"partition-id={i} num-partitions=3")
        yield fed
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())


# client-level DP with noise the local run draws the same: the nodes clip, the server noises
# the sum SecAgg+ reveals, and the result is the local engine's (which clips on the server)
CLIENT_DP = {
    "privacy.mode": "client",
    "privacy.epsilon": 8,
    "privacy.clip": 0.05,
    "privacy.reproducible_noise_not_private": True,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", {}), ("lora", CLIENT_DP)],
    ids=["lora", "lora-client-dp"],
)
def test_secagg_round_equals_plain_fedavg_within_quantization(
    federation, tmp_path: Path, method: str, extra: dict
):
    sets = {**BASE, **SECURE, **extra, "method.name": method, "name": f"secagg-{method}",
            "output_dir": str(tmp_path / "runs")}  # fmt: skip
    run_id = federation.run_app(f'fedft-set="{sets_string(sets)}"')
    run_dir = tmp_path / "runs" / f"secagg-{method}"
    status = federation.wait(run_id, done_file=run_dir / rundir.SUMMARY)
    assert status == "finished:completed", federation.logs(run_id)
    (line,) = rundir.read_metrics(run_dir)
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    if not extra:  # (a client-level DP line withholds who took part)
        assert line["clients"] == [0, 1, 2] and not line["failed"]
    assert line["train_loss"] is None  # no client's loss reaches the server

    local_summary, local_lines = local_run(tmp_path, {**BASE, **extra, "method.name": method})
    assert summary.get("privacy") == local_summary.get("privacy")
    secure, _ = rundir.load_checkpoint(run_dir)
    plain, _ = rundir.load_checkpoint(tmp_path / "local" / "run")
    start = build_task(build_config(base={**BASE, **extra, "method.name": method}))
    initial = {n: p.detach() for n, p in start.model.named_parameters()}
    # Each update is scaled by rows / max_weight, quantized in steps of 2 x clip / 2^22 and
    # summed over 3 nodes, then divided by the summed weights (about 2): well under 1e-5.
    moved, names = 0.0, [n for n in plain if n.startswith("global.")]
    assert names and set(names) == {n for n in secure if n.startswith("global.")}
    for name in names:
        torch.testing.assert_close(secure[name], plain[name], rtol=0, atol=1e-5)
        change = plain[name] - initial[name.removeprefix("global.")]
        moved = max(moved, float(change.abs().max()))
    assert moved > 5e-4  # the round moved the model: the agreement is not that of two copies

    if extra:
        return  # a client-level DP line keeps no per-client bytes
    # The protocol's records (keys, shares, masked updates, unmasking) are counted both ways,
    # and cost more than the plain exchange of the same tensors.
    for way in ("bytes_up", "bytes_down"):
        plain_bytes = [c[way] for c in local_lines[0]["per_client"]]
        secure_bytes = [c[way] for c in line["per_client"]]
        assert all(s > p for s, p in zip(secure_bytes, plain_bytes, strict=True)), way
    assert summary["wire_bytes"] >= line["round_bytes"]  # and the final client evaluation


def test_secure_aggregation_refuses_the_local_engine_and_other_servers(tmp_path: Path, capsys):
    code = cli_main(["run", *TINY_CLI, "--set", "federation.secure_aggregation=true",
                     "--set", f"output_dir={tmp_path}"])  # fmt: skip
    assert code != 0
    err = capsys.readouterr().err
    assert "Flower deployment" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written
    for method, extra in (("zo", {}), ("lora", {"method.aggregation": "exact"})):
        cfg = tiny_config(tmp_path, method, **{"federation.secure_aggregation": True, **extra})
        with pytest.raises(ConfigError, match="needs more than the sum"):
            make_server(build_task(cfg))
