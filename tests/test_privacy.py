"""Differential privacy for the backprop methods: DP-SGD through Opacus (sample-level) and
DP-FedAvg (client-level), the accountant, the budget and resuming."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from fedft.errors import ConfigError
from fedft.federation.engine import Task, build_task, run_federation
from fedft.federation.training import parameters_by_name, read_state, write_state
from fedft.metrics import rundir
from fedft.privacy import MechanismPlan, plan_client
from fedft.privacy.accounting import calibrate_noise, rdp_floor
from fedft.privacy.client_level import noisy_mean_update, round_participants
from fedft.privacy.dp_sgd import PrivateSteps, uses_ghost_clipping
from fedft.privacy.noise import SecretRandom, SeededRandom

from helpers import CrashAfter, assert_same_global_state, shared_dataset, tiny_config

CASES = [
    ("full", "tiny-bert", {}),
    ("bias", "tiny-bert", {}),
    ("adapter", "tiny-bert", {}),
    ("prompt", "tiny-bert", {}),
    ("lora", "tiny-bert", {}),
    ("lora", "tiny-bert", {"model.head": "zero_shot"}),  # the cosine head's own grad sampler
    ("head", "tiny-bert", {"model.head": "zero_shot"}),
    ("full", "tiny-vit", {}),
    ("prompt", "tiny-vit", {"method.deep": True}),
]


def dp_task(tmp_path: Path, method: str, model: str = "tiny-bert", **sets) -> Task:
    if model == "tiny-vit":
        sets.setdefault("data.source", str(shared_dataset("optdigits")))
    # the task's own (random) head unless a case asks for another: `auto` would take the
    # zero-shot head under sample-level DP
    sets = {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "model.head": "task", **sets}
    return build_task(tiny_config(tmp_path, method, model=model, **sets))


def no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def one_sgd_step(task: Task, batch, noise_multiplier: float, seed: int = 0) -> dict:
    """Parameters moved by one DP-SGD step at lr 1 (so the move is minus the noised gradient)."""
    names = task.method.trainable_names
    before = read_state(task.model, names)
    plan = MechanismPlan(noise_multiplier, 0.1, 1, 1, float(len(batch["labels"])))
    task.model.train()
    with PrivateSteps(task.model, names, task.cfg, 1.0, plan, seed) as private:
        private.step(batch)
    after = read_state(task.model, names)
    write_state(task.model, before)
    return {n: before[n] - after[n] for n in names}


def first_batch(task: Task, size: int) -> dict[str, torch.Tensor]:
    return task.data.train.batch(task.data.clients[0].train[:size])


@pytest.mark.parametrize("clipping", ["per_example", "ghost"])
@pytest.mark.parametrize(("method", "model", "sets"), CASES)
def test_dp_sgd_step_is_the_mean_of_per_example_gradients_clipped_to_c(
    tmp_path: Path, method, model, sets, clipping: str
):
    """Both ways of clipping: each example's gradient materialized, or only its norm (ghost
    clipping) and then one backward pass of the clipped losses' sum."""
    clip = 0.05  # small enough that some examples are clipped and the clipped norm is exact
    sets = {"train.optimizer": "sgd", "privacy.clip": clip, "privacy.clipping": clipping, **sets}
    task = dp_task(tmp_path, method, model, **sets)
    no_dropout(task.model)
    batch = first_batch(task, 6)
    moved = one_sgd_step(task, batch, noise_multiplier=0.0)

    names = task.method.trainable_names
    params = list(parameters_by_name(task.model, names).values())
    expected = {n: torch.zeros_like(p) for n, p in zip(names, params, strict=True)}
    norms = []
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = F.cross_entropy(task.model(one), one["labels"])
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        norms.append(norm)
        for n, g in zip(names, grads, strict=True):
            expected[n] += g * min(1.0, clip / (norm + 1e-6)) / 6
    assert any(n > clip for n in norms) and sorted(norms)[0] > 0
    for n in names:
        torch.testing.assert_close(moved[n], expected[n], rtol=2e-3, atol=1e-7)

    # one example alone: the step it makes has norm min(|g|, C), never more than C
    single = {k: v[:1] for k, v in batch.items()}
    moved_one = one_sgd_step(task, single, noise_multiplier=0.0)
    norm_one = math.sqrt(sum(float(t.square().sum()) for t in moved_one.values()))
    assert norm_one <= clip * (1 + 1e-5)
    assert norm_one == pytest.approx(min(norms[0], clip), rel=1e-4)


def test_auto_clipping_takes_ghost_norms_where_per_example_gradients_would_pass_a_gigabyte(
    tmp_path: Path,
):
    cfg = dp_task(tmp_path, "lora").cfg
    params = [nn.Parameter(torch.zeros(1000))]  # 4 kB a gradient
    assert not uses_ghost_clipping(cfg, params, 250_000.0)  # 1.0 GB: not past it
    assert uses_ghost_clipping(cfg, params, 250_001.0)
    forced = cfg.model_copy(
        update={"privacy": cfg.privacy.model_copy(update={"clipping": "ghost"})}
    )
    assert uses_ghost_clipping(forced, params, 1.0)


def test_dp_sgd_noise_has_the_calibrated_standard_deviation(tmp_path: Path):
    clip = 0.5
    task = dp_task(
        tmp_path,
        "full",
        **{
            "train.optimizer": "sgd",
            "privacy.clip": clip,
            "privacy.noise_multiplier": None,
            "privacy.epsilon": 3.0,
        },
    )
    no_dropout(task.model)
    rows = len(task.data.clients[0].train)
    plan = plan_client(task.cfg, rows)
    # the calibrated sigma is Opacus's own answer for this client's schedule
    opacus_sigma = get_noise_multiplier(
        target_epsilon=3.0,
        target_delta=1e-5,
        sample_rate=16 / rows,
        steps=3 * 2,
        accountant="rdp",
        epsilon_tolerance=0.03,
    )
    assert plan.noise_multiplier == pytest.approx(opacus_sigma)
    batch = first_batch(task, 16)
    clean = one_sgd_step(task, batch, 0.0)
    noisy = one_sgd_step(task, batch, plan.noise_multiplier, seed=1)
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean]).double()
    expected = plan.noise_multiplier * clip / 16
    assert noise.numel() > 100_000
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())


def test_client_level_update_is_clipped_and_noised_on_the_sum():
    current = {"a": torch.zeros(3), "b": torch.zeros(2)}
    big = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([0.0, 4.0])}  # norm 5
    small = {"a": torch.tensor([0.1, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0])}  # norm 0.1
    plan = MechanismPlan(0.0, 0.5, 1, 10, 4.0)  # m = 4 expected clients, 2 answered
    new, metrics = noisy_mean_update(current, [big, small], plan, clip=1.0, noise=SeededRandom(0))
    # (clip(big) + small) / 4: big shrinks to norm 1
    assert new["a"].tolist() == pytest.approx([(0.6 + 0.1) / 4, 0.0, 0.0])
    assert new["b"].tolist() == pytest.approx([0.0, 0.8 / 4])
    assert metrics["dp_clipped_fraction"] == 0.5

    field = {"w": torch.zeros(200_000)}
    plan = MechanismPlan(1.7, 0.5, 1, 10, 5.0)
    for source in (SecretRandom(), SeededRandom(0)):
        noised, _ = noisy_mean_update(field, [field], plan, clip=0.3, noise=source)
        assert float(noised["w"].std()) == pytest.approx(1.7 * 0.3 / 5, rel=0.01)
        assert abs(float(noised["w"].mean())) < 5 * 1.7 * 0.3 / 5 / math.sqrt(200_000)


def test_client_sampling_is_poisson_with_the_rounds_rate(tmp_path: Path):
    sets = {"federation.clients": 20, "privacy.mode": "client", "privacy.epsilon": 8.0}
    cfg = tiny_config(tmp_path, "lora", **sets)
    sizes = [len(round_participants(cfg, r)) for r in range(1, 2001)]
    assert np.mean(sizes) == pytest.approx(10, rel=0.03)
    assert len(set(sizes)) > 5  # the size varies, unlike the fixed-count sampler
    # secret: the same seed and round draw other clients each time ...
    assert [round_participants(cfg, r) for r in range(1, 30)] != [
        round_participants(cfg, r) for r in range(1, 30)
    ]
    # ... unless the run asks for reproducible, not-private draws
    cfg = tiny_config(tmp_path, "lora", **sets, **{"privacy.reproducible_noise_not_private": True})
    assert round_participants(cfg, 7) == round_participants(cfg, 7)


def run(task: Task, name: str, resume: bool = False) -> tuple[dict, list[dict], Path]:
    run_dir = Path(task.cfg.output_dir) / name
    if not resume:
        rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir, resume=resume)
    return summary, rundir.read_metrics(run_dir), run_dir


def test_sample_level_epsilon_equals_opacus_for_each_clients_steps(tmp_path: Path):
    task = dp_task(
        tmp_path,
        "lora",
        **{"privacy.noise_multiplier": None, "privacy.epsilon": 4.0, "federation.rounds": 3},
    )
    summary, lines, _ = run(task, "sample")
    spent = lines[-1]["epsilon_per_client"]
    for client, split in enumerate(task.data.clients):
        rounds_joined = sum(client in line["clients"] for line in lines)
        if rounds_joined == 0:
            assert str(client) not in spent
            continue
        rows = len(split.train)
        sigma = plan_client(task.cfg, rows).noise_multiplier
        accountant = RDPAccountant()
        for _ in range(rounds_joined * 3):  # max_steps=3 Poisson steps per round joined
            accountant.step(noise_multiplier=sigma, sample_rate=16 / rows)
        assert spent[str(client)] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert spent[str(client)] <= 4.0
    assert summary["privacy"]["epsilon_max"] == max(spent.values())
    assert all(line["train_loss"] is None for line in lines)  # a DP client keeps its loss home


def test_client_level_epsilon_counts_every_round_at_the_client_rate(tmp_path: Path):
    task = build_task(
        tiny_config(
            tmp_path,
            "bias",
            **{"privacy.mode": "client", "privacy.epsilon": 8.0, "federation.rounds": 3},
        )
    )
    summary, lines, _ = run(task, "client")
    sigma = get_noise_multiplier(
        target_epsilon=8.0,
        target_delta=1e-5,
        sample_rate=0.5,
        steps=3,
        accountant="rdp",
        epsilon_tolerance=0.08,
    )
    accountant = RDPAccountant()
    for line in lines:
        accountant.step(noise_multiplier=sigma, sample_rate=0.5)
        eps = accountant.get_epsilon(1e-5)
        assert line["epsilon_max"] == pytest.approx(eps, rel=1e-9)
        # one mechanism for the population: one figure, not a list as long as the population
        assert line["epsilon_all_clients"] == line["epsilon_max"]
        assert "epsilon_per_client" not in line
        assert "dp_clipped_fraction" not in line  # raw update norms are not privatized
    assert summary["privacy"]["mode"] == "client" and summary["privacy"]["epsilon_max"] <= 8.0


@pytest.mark.parametrize(
    ("method", "sets"),
    [
        ("lora", {"privacy.mode": "sample", "privacy.epsilon": 6.0}),
        ("head", {"privacy.mode": "client", "privacy.epsilon": 20.0}),
    ],
)
def test_a_resumed_dp_run_equals_an_unbroken_one(tmp_path: Path, method, sets):
    # bit-equality needs the noise replayed: only the not-private test option does that
    sets = {**sets, "federation.rounds": 3, "privacy.reproducible_noise_not_private": True}
    full, _, a = run(build_task(tiny_config(tmp_path, method, **sets)), "a")
    b = Path(tmp_path / "runs" / "b")
    rundir.start_run_dir(b, "{}", overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        run_federation(build_task(tiny_config(tmp_path, method, **sets)), b, progress=CrashAfter(2))
    assert len(rundir.read_metrics(b)) == 2
    resumed = run_federation(build_task(tiny_config(tmp_path, method, **sets)), b, resume=True)
    assert resumed["privacy"] == full["privacy"]
    assert resumed["privacy"]["epsilon_max"] > 0
    assert resumed["final_loss"] == full["final_loss"]
    assert_same_global_state(a, b)


def test_budgets_that_cannot_be_met_are_refused_with_the_reason(tmp_path: Path):
    with pytest.raises(ConfigError, match="client 0 .*privacy.epsilon=0.0001 cannot be met"):
        dp_task(tmp_path, "lora", **{"privacy.noise_multiplier": None, "privacy.epsilon": 1e-4})
    with pytest.raises(ConfigError, match="client-level DP with 4 clients: .*cannot be met"):
        build_task(
            tiny_config(tmp_path, "lora", **{"privacy.mode": "client", "privacy.epsilon": 0.05})
        )
    with pytest.raises(ConfigError, match="client-level DP would spend"):
        build_task(
            tiny_config(
                tmp_path,
                "lora",
                **{
                    "privacy.mode": "client",
                    "privacy.epsilon": 1.0,
                    "privacy.noise_multiplier": 0.5,
                },
            )
        )
    with pytest.raises(ConfigError, match="method .zo. does not offer it; methods that do: .*lora"):
        build_task(tiny_config(tmp_path, "zo", **{"privacy.mode": "client", "privacy.epsilon": 8}))


def test_an_epsilon_below_the_rdp_floor_is_refused_before_any_search():
    # what Opacus's RDP accountant reports under overwhelming noise: no noise gets below it
    accountant = RDPAccountant()
    accountant.history = [(1e4, 0.5, 2)]
    assert rdp_floor(1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-5)
    with pytest.raises(ConfigError, match="no less than 0.103 with any noise"):
        calibrate_noise(0.1, 1e-5, 0.5, 2)
    above = calibrate_noise(0.2, 1e-5, 0.5, 2)  # above the floor: a noise that meets it
    accountant.history = [(above, 0.5, 2)]
    assert accountant.get_epsilon(1e-5) <= 0.2


def test_client_level_run_ends_when_another_round_would_cross_the_target(tmp_path: Path):
    sets = {
        "privacy.mode": "client",
        "privacy.noise_multiplier": 1.0,
        "privacy.epsilon": 5.0,
        "federation.rounds": 8,
    }
    summary, lines, _ = run(build_task(tiny_config(tmp_path, "head", **sets)), "ends")
    accountant, affordable = RDPAccountant(), 0
    while True:
        accountant.step(noise_multiplier=1.0, sample_rate=0.5)
        if accountant.get_epsilon(1e-5) > 5.0:
            break
        affordable += 1
    assert 1 <= affordable < 8
    assert len(lines) == affordable == summary["rounds_completed"]
    assert "client-level DP" in summary["stopped"]
    assert summary["privacy"]["epsilon_max"] <= 5.0


def test_the_ledger_keeps_each_clients_epsilon_until_its_history_changes():
    """Cached epsilons stay equal to the accountant's on each client's whole history: after more
    steps for one client (its entry recomputed), and after a resumed ledger (cache rebuilt)."""
    from fedft.config import PrivacyConfig
    from fedft.privacy.accounting import PrivacyLedger, epsilon_for

    cfg = PrivacyConfig(mode="sample", epsilon=8.0, delta=1e-5)
    ledger = PrivacyLedger(cfg)
    for client in range(3):
        ledger.record(client, 1.1, 0.05 * (client + 1), 20)
    first = ledger.spent()
    ledger.record(1, 1.1, 0.1, 20)  # same sigma and rate: its history's steps grow
    ledger.record(2, 0.9, 0.15, 5)  # a new segment
    after = ledger.spent()
    assert after[0] == first[0]
    for client, history in ledger.histories.items():
        assert after[client] == pytest.approx(epsilon_for(history, 1e-5), rel=1e-12)
    assert after[1] > first[1] and after[2] > first[2]
    resumed = PrivacyLedger(cfg)
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.spent() == pytest.approx(after, rel=1e-12)
