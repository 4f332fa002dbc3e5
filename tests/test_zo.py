"""`zo`: the SPSA estimator, perturb-and-restore, seed replay on the server and on catching-up
clients, DP on the scalar (noise, clipping, epsilon, budgets), and that no backward pass runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn

from fedft.errors import ConfigError
from fedft.federation.aggregation import weighted_mean
from fedft.federation.client import ClientContext, ClientRuntime
from fedft.federation.engine import build_task, run_federation
from fedft.federation.grid import LocalGrid
from fedft.federation.training import parameters_by_name, read_state
from fedft.methods.zo import SYNCED
from fedft.methods.zo.directions import add_direction
from fedft.methods.zo.records import RoundRecord, pack_records
from fedft.methods.zo.spsa import ScalarPrivacy, privatize, zo_step
from fedft.metrics import rundir
from fedft.privacy import plan_client
from fedft.privacy.noise import SecretRandom

from helpers import assert_same_global_state, tiny_config


class SoftmaxRegression(nn.Module):
    """A model whose loss and gradient are known in closed form (autograd gives the reference)."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def forward(self, batch):
        return self.linear(batch["x"])


# SPSA alone on a fresh classifier: what these tests take apart (the defaults' zero-shot start and
# exact head are tests/test_zo_variants.py's)
PLAIN = {"method.start": "task", "method.head": "zo"}


def zo_task(tmp_path: Path, **sets):
    return build_task(tiny_config(tmp_path, "zo", **{**PLAIN, **sets}))


def one_round(task, clients: list[int], round_number: int = 1):
    """Run one round of the method's server; snapshot each client's trained tensors."""
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    trained = {}
    runtime = ClientRuntime(task.method, task.model, task.data, task.cfg, task.device)
    grid = LocalGrid(
        runtime,
        task.device,
        on_reply=lambda r: trained.__setitem__(
            r.client, read_state(task.model, task.method.trainable_names)
        ),
    )
    outcome = server.run_round(round_number, grid, clients)
    return server, runtime, grid, outcome, trained


def test_average_of_zo_estimates_points_along_the_true_gradient():
    torch.manual_seed(0)
    model = SoftmaxRegression(6, 3)
    batch = {"x": torch.randn(32, 6), "labels": torch.randint(0, 3, (32,))}
    params = list(model.parameters())
    loss = F.cross_entropy(model(batch), batch["labels"])
    true = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    before = [p.detach().clone() for p in params]
    estimate = torch.zeros_like(true)
    draws = 4000
    for seed in range(draws):
        (g,), _ = zo_step(model, params, [False, False], batch, [seed], 1e-3, 0.0, 0.0)
        z = [torch.zeros_like(p) for p in params]
        add_direction(z, seed, [1.0, 1.0])
        estimate += float(g) * torch.cat([t.flatten() for t in z])
    estimate /= draws
    cosine = F.cosine_similarity(estimate, true, dim=0)
    assert cosine > 0.9, float(cosine)
    # the norm is unbiased too (SPSA's expectation is the gradient itself)
    assert float(estimate.norm() / true.norm()) == pytest.approx(1.0, abs=0.15)
    for p, b in zip(params, before, strict=True):  # lr 0: every step restored the parameters
        assert torch.allclose(p, b, atol=1e-6)


def test_perturb_and_restore_returns_the_original_parameters(tmp_path: Path):
    task = zo_task(tmp_path)
    params = list(parameters_by_name(task.model, task.method.trainable_names).values())
    assert sum(p.numel() for p in params) > 1_000_000 or len(params) > 20  # all weights
    before = [p.detach().clone() for p in params]
    eps = 1e-3
    for seed in (1, 2, 3):
        add_direction(params, seed, [eps] * len(params))
        assert max(float((p - b).abs().max()) for p, b in zip(params, before, strict=True)) > eps
        add_direction(params, seed, [-2 * eps] * len(params))
        add_direction(params, seed, [eps] * len(params))
    worst = max(float((p - b).abs().max()) for p, b in zip(params, before, strict=True))
    assert worst <= 1e-6, worst  # stated tolerance: float32 rounding of +eps z - 2 eps z + eps z


@pytest.mark.parametrize(
    "sets",
    [
        {},
        {"train.weight_decay": 0.1, "method.directions": 2},
        {"method.params": "lora", "method.seed_pool": 5, "train.weight_decay": 0.05},
    ],
    ids=["plain", "decay-2dirs", "lora-pool"],
)
def test_server_seed_replay_reproduces_the_clients_parameters(tmp_path: Path, sets: dict):
    task = zo_task(tmp_path, **{"train.lr": 1e-2, **sets})
    server, _, _, outcome, trained = one_round(task, [0, 2])
    assert all(r.ok for r in outcome.replies)
    up = outcome.replies[0].payload.tensors
    assert set(up) == {"seeds", "grads"}  # no parameters went up
    if "method.seed_pool" in sets:
        assert up["seeds"].dtype == torch.int32 and int(up["seeds"].max()) < 5
    weights = [float(r.payload.scalars["num_examples"]) for r in outcome.replies]
    expected = weighted_mean([trained[0], trained[2]], weights)
    moved = 0.0
    start = task.method.initial_state()
    for name, value in server.global_state.items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 1e-4  # the round changed the model


def test_a_client_that_missed_rounds_replays_them_to_the_servers_exact_parameters(tmp_path: Path):
    task = zo_task(tmp_path, **{"train.lr": 1e-2, "train.weight_decay": 0.1})
    server, runtime, grid, _, _ = one_round(task, [0, 1])
    for round_number, clients in ((2, [1, 2]), (3, [0, 2]), (4, [0, 2])):
        server.run_round(round_number, grid, clients)
    assert server.synced == {0: 3, 1: 1, 2: 3}
    payload = server.catch_up(1)  # client 1 holds version 1: it gets records 2, 3 and 4
    assert payload.scalars["sync"] == "records" and payload.scalars["base"] == 1
    assert payload.tensors["counts"].numel() == 3
    assert payload.nbytes < sum(t.numel() * 4 for t in server.global_state.values())
    ctx = ClientContext(
        1, 5, task.model, task.data, task.data.clients[1], task.cfg, task.device,
        task.method.trainable_names, runtime.states[1],
    )  # fmt: skip
    task.method.sync(ctx, payload)
    for name, value in read_state(task.model, task.method.trainable_names).items():
        assert torch.equal(value, server.global_state[name]), name
    # a client that lost what it held is refused with a message, and caught up in full next time
    runtime.states[1].clear()
    with pytest.raises(RuntimeError, match="out of sync"):
        task.method.sync(ctx, payload)


def test_catch_up_sends_the_whole_state_where_that_is_fewer_bytes(tmp_path: Path):
    task = zo_task(tmp_path, **{"method.params": "head"})
    server, *_ = one_round(task, [0, 1, 2, 3])
    state_bytes = sum(t.numel() * 4 for t in server.global_state.values())
    pairs = state_bytes // 12 + 1  # more (seed, coefficient) pairs than the state has bytes
    server.records.append(
        RoundRecord(torch.arange(pairs), torch.zeros(pairs, 1), 1.0)
    )  # a long history
    payload = server.catch_up(3)
    assert payload.scalars["sync"] == "full" and payload.tensor_bytes == state_bytes
    replay = pack_records(server.records, 0, server.version, 0.0)
    assert payload.nbytes < replay.nbytes


def test_seeds_mode_uploads_twelve_bytes_per_step_and_delta_mode_the_tensors(tmp_path: Path):
    seeds = zo_task(tmp_path / "s", **{"method.params": "lora", "federation.rounds": 1})
    run_dir = Path(seeds.cfg.output_dir) / "r"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    run_federation(seeds, run_dir)
    (line,) = rundir.read_metrics(run_dir)
    steps = seeds.cfg.train.max_steps
    assert line["bytes_up_per_client"] == steps * (8 + 4)  # int64 seed + float32 scalar
    delta = zo_task(
        tmp_path / "d", **{"method.params": "lora", "method.mode": "delta", "federation.rounds": 1}
    )
    run_dir = Path(delta.cfg.output_dir) / "r"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    run_federation(delta, run_dir)
    (line,) = rundir.read_metrics(run_dir)
    assert line["bytes_up_per_client"] == delta.trainable_bytes


def test_resumed_zo_run_equals_an_unbroken_one(tmp_path: Path):
    sets = {"train.lr": 1e-2, "federation.rounds": 3, "train.weight_decay": 0.01}
    unbroken = zo_task(tmp_path, **sets)
    a = Path(unbroken.cfg.output_dir) / "a"
    rundir.start_run_dir(a, "{}", overwrite=False)
    full = run_federation(unbroken, a)
    stopped = zo_task(tmp_path, **{**sets, "federation.rounds": 2})
    b = Path(stopped.cfg.output_dir) / "b"
    rundir.start_run_dir(b, "{}", overwrite=False)
    run_federation(stopped, b)
    resumed = run_federation(zo_task(tmp_path, **sets), b, resume=True)
    assert resumed["final_loss"] == full["final_loss"]
    assert_same_global_state(a, b)


def test_dp_noise_has_the_calibrated_standard_deviation(tmp_path: Path):
    cfg = tiny_config(
        tmp_path, "zo", **{"privacy.mode": "sample", "privacy.epsilon": 2.0, "privacy.clip": 0.5}
    )
    plan = plan_client(cfg, 60)
    dp = ScalarPrivacy(
        cfg.privacy.clip, plan.noise_multiplier, plan.expected_batch, plan.sample_rate
    )
    generator = SecretRandom()  # what a DP run draws from
    draws = torch.stack([privatize(torch.zeros(0, 1), dp, generator) for _ in range(20000)])
    expected = plan.noise_multiplier * cfg.privacy.clip / plan.expected_batch
    assert float(draws.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(draws.mean())) < 4 * expected / np.sqrt(20000)
    # every example contributes at most C: huge scalars, tiny noise, the mean is b * C / B
    quiet = ScalarPrivacy(0.5, 1e-9, 16.0, 0.25)
    huge = torch.tensor([[1e6], [-1e6], [1e6], [3e6]])
    assert float(privatize(huge, quiet, generator)) == pytest.approx(2 * 0.5 / 16, rel=1e-6)
    two = torch.tensor([[3.0, 4.0]])  # two directions are clipped jointly to L2 norm C
    assert privatize(two, quiet, generator).tolist() == pytest.approx([0.3 / 16, 0.4 / 16])


def test_reported_epsilon_equals_opacus_for_the_same_schedule(tmp_path: Path):
    cfg = tiny_config(
        tmp_path,
        "zo",
        **{
            "privacy.mode": "sample",
            "privacy.epsilon": 3.0,
            "federation.rounds": 3,
            "federation.sample_fraction": 1.0,
            "method.params": "lora",
        },
    )
    task = build_task(cfg)
    run_dir = Path(cfg.output_dir) / "dp"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    lines = rundir.read_metrics(run_dir)
    for client, split in enumerate(task.data.clients):
        plan = plan_client(cfg, len(split.train))
        accountant = RDPAccountant()
        accountant.history = [(plan.noise_multiplier, plan.sample_rate, 3 * cfg.train.max_steps)]
        expected = accountant.get_epsilon(cfg.privacy.delta)
        assert lines[-1]["epsilon_per_client"][str(client)] == pytest.approx(expected, rel=1e-9)
        assert expected <= 3.0  # calibrated over every round the client could join
    assert summary["privacy"]["epsilon_max"] == max(lines[-1]["epsilon_per_client"].values())
    assert lines[0]["epsilon_max"] < lines[-1]["epsilon_max"]


def test_a_budget_that_cannot_be_met_is_refused_before_training(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot be met"):
        zo_task(tmp_path, **{"privacy.mode": "sample", "privacy.epsilon": 1e-4})
    with pytest.raises(ConfigError, match="would spend"):
        zo_task(
            tmp_path,
            **{"privacy.mode": "sample", "privacy.epsilon": 1.0, "privacy.noise_multiplier": 0.3},
        )
    with pytest.raises(ConfigError, match="server_optimizer"):
        zo_task(tmp_path, **{"federation.server_optimizer": "fedadam"})
    with pytest.raises(ConfigError, match="method.params_options.rank"):
        zo_task(tmp_path, **{"method.params": "lora", "method.params_options": {"rank": 2}})


def test_a_client_whose_budget_is_spent_stops_taking_part(tmp_path: Path):
    # an explicit noise multiplier with a target: each round costs some epsilon, the target
    # allows each client a few rounds, but not all ten
    sets = {
        "privacy.mode": "sample",
        "privacy.noise_multiplier": 1.2,
        "privacy.epsilon": 4.0,
        "federation.clients": 2,
        "federation.rounds": 10,
        "federation.sample_fraction": 1.0,
        "train.max_steps": 4,
        "method.params": "head",
    }
    task = zo_task(tmp_path, **sets)
    run_dir = Path(task.cfg.output_dir) / "budget"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    lines = rundir.read_metrics(run_dir)
    assert summary["stopped"] and "privacy budget" in summary["stopped"]
    assert 1 <= len(lines) < 10
    assert all(e <= 4.0 for e in lines[-1]["epsilon_per_client"].values())
    dropped = [m for m in lines if m["budget_spent_clients"]]
    assert dropped and all(not set(m["budget_spent_clients"]) & set(m["clients"]) for m in dropped)
    text = (run_dir / rundir.SUMMARY).read_text()
    assert json.loads(text)["privacy"]["target_epsilon"] == 4.0


def test_no_backward_pass_runs_in_a_zo_round(tmp_path: Path, monkeypatch):
    calls = []
    real_backward = torch.autograd.backward

    def counting_backward(*args, **kwargs):
        calls.append(1)
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counting_backward)  # Tensor.backward calls it
    task = zo_task(tmp_path, **{"method.params": "lora", "train.weight_decay": 0.1})
    assert not any(p.requires_grad for p in task.model.parameters())
    _, _, _, outcome, _ = one_round(task, [0, 1])
    assert all(r.ok for r in outcome.replies) and calls == []
    control = build_task(tiny_config(tmp_path / "lora", "lora"))
    one_round(control, [0])
    assert calls  # the spy does see backprop


def run_rounds(task, cohorts: list[list[int]], fresh_process: bool):
    """Rounds of the seeds-mode server over a runtime; `fresh_process` forgets the process's
    shared copy before every message, as a Flower ClientApp started per message does."""
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    runtime = ClientRuntime(task.method, task.model, task.data, task.cfg, task.device)
    handle = runtime.handle

    def forgetful(message):
        task.method.shared_copy = None
        return handle(message)

    if fresh_process:
        runtime.handle = forgetful
    grid = LocalGrid(runtime, task.device)
    for number, cohort in enumerate(cohorts, start=1):
        assert all(r.ok for r in server.run_round(number, grid, cohort).replies)
    return server, runtime


def test_clients_of_a_process_share_one_copy_of_their_synced_version(tmp_path: Path):
    sets = {
        "federation.clients": 20,
        "data.partition": "iid",
        "train.lr": 1e-2,
        "train.weight_decay": 0.01,
        "train.max_steps": 2,
    }
    # clients that miss rounds, come back, and join for the first time late
    cohorts = [list(range(0, 8)), list(range(5, 14)), [0, 1, *range(14, 20)], [2, 7, 13, 19]]
    task = zo_task(tmp_path / "shared", **sets)
    names = task.method.trainable_names
    server, runtime = run_rounds(task, cohorts, fresh_process=False)
    assert len(runtime.states) == 20
    copy = task.method.shared_copy
    assert copy is not None and copy.version == len(cohorts) - 1
    shared = {t.data_ptr() for t in copy.tensors.values()}
    held = {v.data_ptr() for s in runtime.states.values() for v in s.values() if torch.is_tensor(v)}
    assert held <= shared  # no client holds a tensor of its own: the states cost their version
    assert all(set(s) <= {"version"} | {SYNCED + n for n in names} for s in runtime.states.values())

    # clients that each keep their own copy (a fresh process per message) end at the same model
    own = zo_task(tmp_path / "own", **sets)
    own_server, own_runtime = run_rounds(own, cohorts, fresh_process=True)
    kept = {
        v.data_ptr() for s in own_runtime.states.values() for v in s.values() if torch.is_tensor(v)
    }
    assert len(kept) == 20 * len(names)  # one copy per client: what sharing saves
    for name, value in server.global_state.items():
        assert torch.equal(value, own_server.global_state[name]), name


def test_starting_weights_of_killed_processes_are_removed_and_live_ones_kept():
    """A zo client's version-0 file outlives a process killed before its exit hook; the next
    zo process removes it by the dead pid in its name, and leaves a live process's alone."""
    import subprocess
    import tempfile
    from pathlib import Path

    from fedft.methods.zo import START_PREFIX, remove_orphaned_starts

    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid names no process now
    tmp = Path(tempfile.gettempdir())
    orphan = tmp / f"{START_PREFIX}{finished.pid}-test.safetensors"
    mine = tmp / f"{START_PREFIX}{os.getpid()}-test.safetensors"
    for path in (orphan, mine):
        path.write_bytes(b"x")
    try:
        remove_orphaned_starts()
        assert not orphan.exists()
        assert mine.exists()
    finally:
        orphan.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)
