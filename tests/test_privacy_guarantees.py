"""Privacy that holds against the party DP guards against: secret noise and sampling, nothing
unnoised in the logs under client-level DP, the not-private test option marked everywhere, and
every reported epsilon checked against an accountant that is not Opacus's (Google's
`dp-accounting`, RDP and PLD)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import RDPAccountant

from fedft.federation.engine import Task, build_task, run_federation
from fedft.federation.training import read_state
from fedft.metrics import rundir
from fedft.metrics.report import format_summary
from fedft.privacy import plan_client, plan_population
from fedft.privacy.dp_sgd import train_privately
from fedft.privacy.noise import SecretRandom, SeededRandom, dp_random

from helpers import CrashAfter, tiny_config

# dp-accounting's RDP with Opacus's orders reproduces Opacus's RDP epsilon to this relative
# tolerance (measured: within 0.05%); its PLD accountant is tighter than RDP (measured RDP/PLD
# 1.10 to 1.15 for these mechanisms) and agrees with Opacus's PRV accountant within 1%.
RDP_TOLERANCE = 0.005
PRV_TOLERANCE = 0.02
RDP_OVER_PLD_AT_MOST = 1.3

NOT_PRIVATE = {"privacy.reproducible_noise_not_private": True}


@pytest.fixture(autouse=True)
def _quiet_dp_accounting():
    """dp-accounting logs a warning per RDP order it cannot evaluate; the bound stays valid."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def run(task: Task, name: str) -> tuple[dict, list[dict], Path]:
    run_dir = Path(task.cfg.output_dir) / name
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    return summary, rundir.read_metrics(run_dir), run_dir


def independent_epsilons(segments: list[tuple[float, float, int]], delta: float):
    """(RDP epsilon, PLD epsilon) from dp-accounting for Poisson-subsampled Gaussian segments
    (sigma, q, steps) composed in order."""
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in segments
    ]
    rdp = rdp_privacy_accountant.RdpAccountant(RDPAccountant.DEFAULT_ALPHAS)
    pld = pld_privacy_accountant.PLDAccountant()
    for event in events:
        rdp.compose(event)
        pld.compose(event)
    return rdp.get_epsilon(delta), pld.get_epsilon(delta)


def assert_agrees(reported: float, segments, delta: float, accountant: str = "rdp") -> None:
    rdp, pld = independent_epsilons(segments, delta)
    assert pld <= rdp
    if accountant == "rdp":
        assert reported == pytest.approx(rdp, rel=RDP_TOLERANCE)
        assert pld <= reported <= RDP_OVER_PLD_AT_MOST * pld
    else:
        assert reported == pytest.approx(pld, rel=PRV_TOLERANCE)


# --- secret noise and sampling ----------------------------------------------------------------
def trained_state(task: Task, client: int = 0) -> dict[str, torch.Tensor]:
    names = task.method.trainable_names
    start = read_state(task.model, names)
    rows = task.data.clients[client].train
    train_privately(task.model, names, task.data.train, rows, task.cfg, 0.5, seed=7, device="cpu")
    after = read_state(task.model, names)
    for name, value in start.items():
        dict(task.model.named_parameters())[name].data.copy_(value)
    return after


@pytest.mark.parametrize("noise_multiplier", [1.0, 1e-9])
def test_two_dp_runs_with_the_same_seed_draw_different_noise_and_batches(
    tmp_path: Path, noise_multiplier: float
):
    """At sigma 1 the runs differ by their noise; at sigma 1e-9 (noise far below float32's
    resolution of the weights) they can differ only by their Poisson batches. With the
    reproducible test option both are replayed exactly."""
    sets = {
        "privacy.mode": "sample",
        "privacy.noise_multiplier": noise_multiplier,
        "train.optimizer": "sgd",
    }
    secret = build_task(tiny_config(tmp_path, "lora", **sets))
    first, second = trained_state(secret), trained_state(secret)
    assert any(not torch.equal(first[n], second[n]) for n in first)

    seeded = build_task(tiny_config(tmp_path, "lora", **sets, **NOT_PRIVATE))
    first, second = trained_state(seeded), trained_state(seeded)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_dp_randomness_is_secret_unless_the_run_says_it_is_not_private(tmp_path: Path):
    cfg = tiny_config(tmp_path, "lora", **{"privacy.mode": "sample", "privacy.epsilon": 8.0})
    a, b = dp_random(cfg.privacy, 0, 1, 2), dp_random(cfg.privacy, 0, 1, 2)
    assert isinstance(a, SecretRandom) and a.private
    assert not torch.equal(a.uniform(64), b.uniform(64))
    masks = [(dp_random(cfg.privacy, 0, 1, 2).uniform(200) < 0.1) for _ in range(2)]
    assert not torch.equal(*masks)  # the same seed and site give other batches

    cfg = tiny_config(
        tmp_path, "lora", **{"privacy.mode": "sample", "privacy.epsilon": 8.0, **NOT_PRIVATE}
    )
    a, b = dp_random(cfg.privacy, 0, 1, 2), dp_random(cfg.privacy, 0, 1, 2)
    assert isinstance(a, SeededRandom) and not a.private
    assert torch.equal(a.uniform(64), b.uniform(64))
    assert not torch.equal(dp_random(cfg.privacy, 0, 1, 3).uniform(64), b.uniform(64))


def test_secret_gaussian_has_the_asked_moments_and_uniforms_stay_inside_the_interval():
    source = SecretRandom()
    draw = source.normal((3, 400_001), 0.7, torch.float64)  # odd count: pairs are split
    assert draw.shape == (3, 400_001)
    n = draw.numel()
    assert float(draw.std()) == pytest.approx(0.7, rel=0.005)
    assert abs(float(draw.mean())) < 5 * 0.7 / np.sqrt(n)
    # the tails of a Gaussian: 4.55% of draws beyond two standard deviations
    assert float((draw.abs() > 1.4).double().mean()) == pytest.approx(0.0455, abs=0.002)
    u = source.uniform(1_000_000)
    assert float(u.min()) > 0.0 and float(u.max()) <= 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.002)
    assert source.normal((2, 2), 1.0, torch.float32).dtype == torch.float32


# --- what is published -------------------------------------------------------------------------
def test_a_run_with_reproducible_noise_is_marked_not_private_everywhere(tmp_path: Path):
    sets = {"privacy.mode": "sample", "privacy.epsilon": 8.0, **NOT_PRIVATE}
    summary, lines, _ = run(build_task(tiny_config(tmp_path, "lora", **sets)), "seeded")
    assert lines and all(not m["private"] and "NOT PRIVATE" in m["privacy_note"] for m in lines)
    assert not summary["privacy"]["private"] and "NOT PRIVATE" in summary["privacy"]["note"]
    table = format_summary(summary)
    assert "NOT PRIVATE" in table and "no guarantee" in table

    private, lines, _ = run(
        build_task(
            tiny_config(tmp_path, "lora", **{"privacy.mode": "sample", "privacy.epsilon": 8})
        ),
        "secret",
    )
    assert private["privacy"]["private"] and all(m["private"] for m in lines)
    assert "privacy_note" not in lines[0] and "NOT PRIVATE" not in format_summary(private)


def test_client_level_logs_hold_no_participants_and_no_unnoised_client_statistics(tmp_path: Path):
    sets = {
        "privacy.mode": "client",
        "privacy.epsilon": 20.0,
        "federation.clients": 6,
        "federation.rounds": 3,
        "data.local_test_fraction": 0.2,
    }
    summary, lines, run_dir = run(build_task(tiny_config(tmp_path, "bias", **sets)), "client")
    withheld = {
        "clients",
        "per_client",
        "dp_update_norm_median",
        "dp_clipped_fraction",
        "client_seconds_mean",
        "client_seconds_max",
    }
    for line in lines:
        assert not withheld & set(line), line.keys()
        assert line["train_loss"] is None
        assert isinstance(line["participants"], int)
        assert all(
            f["client"] == f["error"] == "withheld under client-level DP" for f in line["failed"]
        )
        assert line["test_accuracy"] is not None  # the released model, scored by the server
    assert summary["client_eval"] == {"withheld": "withheld under client-level DP"}
    assert summary["client_seconds_per_round"] is None
    # no number a client computed from its rows reaches the files: not the loss it trained to
    text = (run_dir / rundir.METRICS).read_text() + (run_dir / rundir.SUMMARY).read_text()
    assert 'train_loss": null' in text and "num_examples" not in text

    # the same run without DP does log them: the redaction is what removes them
    open_summary, open_lines, _ = run(
        build_task(
            tiny_config(tmp_path, "bias", **{k: v for k, v in sets.items() if "privacy" not in k})
        ),
        "open",
    )
    assert open_lines[0]["clients"] and open_lines[0]["train_loss"] is not None
    assert open_summary["client_eval"]["clients"] > 0


# --- epsilon against dp-accounting -------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "accountant", "clipping"),
    [
        ("lora", "rdp", "per_example"),
        ("lora", "prv", "per_example"),
        ("lora", "rdp", "ghost"),
        ("fedpt", "rdp", "per_example"),  # the small model's LoRA and zero-shot head
    ],
)
def test_sample_level_epsilon_agrees_with_dp_accounting(
    tmp_path: Path, method: str, accountant: str, clipping: str
):
    sets = {
        "privacy.mode": "sample",
        "privacy.epsilon": 4.0,
        "privacy.accountant": accountant,
        "privacy.clipping": clipping,
        "federation.rounds": 3,
    }
    task = build_task(tiny_config(tmp_path, method, **sets))
    summary, lines, _ = run(task, "sample")
    spent = lines[-1]["epsilon_per_client"]
    assert spent
    for client, split in enumerate(task.data.clients):
        joined = sum(client in line["clients"] for line in lines)
        if not joined:
            continue
        plan = plan_client(task.cfg, len(split.train))
        segments = [(plan.noise_multiplier, plan.sample_rate, joined * plan.steps_per_round)]
        assert_agrees(spent[str(client)], segments, task.cfg.privacy.delta, accountant)
    assert summary["privacy"]["epsilon_max"] == max(spent.values()) <= 4.0 * 1.01


def test_client_level_epsilon_agrees_with_dp_accounting(tmp_path: Path):
    sets = {"privacy.mode": "client", "privacy.epsilon": 8.0, "federation.rounds": 3}
    task = build_task(tiny_config(tmp_path, "bias", **sets))
    _, lines, _ = run(task, "client")
    plan = plan_population(task.cfg)
    for number, line in enumerate(lines, start=1):
        segments = [(plan.noise_multiplier, plan.sample_rate, number)]
        assert_agrees(line["epsilon_max"], segments, task.cfg.privacy.delta)


def test_zo_epsilon_agrees_with_dp_accounting(tmp_path: Path):
    sets = {
        "privacy.mode": "sample",
        "privacy.epsilon": 3.0,
        "federation.rounds": 3,
        "federation.sample_fraction": 1.0,
        "method.params": "lora",
    }
    task = build_task(tiny_config(tmp_path, "zo", **sets))
    _, lines, _ = run(task, "zo")
    for client, split in enumerate(task.data.clients):
        plan = plan_client(task.cfg, len(split.train))
        segments = [(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)]
        reported = lines[-1]["epsilon_per_client"][str(client)]
        assert_agrees(reported, segments, task.cfg.privacy.delta)


def test_a_resumed_run_spends_what_dp_accounting_counts_for_the_whole_run(tmp_path: Path):
    """Secret noise (the default): the resumed run's noise differs from an unbroken run's, but its
    ledger must count every step of both parts, as dp-accounting does for the whole schedule."""
    sets = {"privacy.mode": "sample", "privacy.epsilon": 6.0, "federation.rounds": 3}
    task = build_task(tiny_config(tmp_path, "lora", **sets))
    run_dir = Path(task.cfg.output_dir) / "resumed"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        run_federation(task, run_dir, progress=CrashAfter(2))
    resumed = build_task(tiny_config(tmp_path, "lora", **sets))
    summary = run_federation(resumed, run_dir, resume=True)
    lines = rundir.read_metrics(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3]
    for client, split in enumerate(resumed.data.clients):
        joined = sum(client in line["clients"] for line in lines)
        if not joined:
            continue
        plan = plan_client(resumed.cfg, len(split.train))
        segments = [(plan.noise_multiplier, plan.sample_rate, joined * plan.steps_per_round)]
        assert_agrees(summary["privacy"]["epsilon_per_client"][str(client)], segments, 1e-5)
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["privacy"]["private"]
