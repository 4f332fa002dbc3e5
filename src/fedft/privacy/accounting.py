"""Privacy accounting shared by every DP mechanism in fedft.

Every mechanism here is a subsampled Gaussian, counted by an Opacus accountant (RDP or PRV):

- sample-level (`privacy.mode=sample`): each local step of a client draws a Poisson batch with
  rate q = batch_size / rows and adds noise with multiplier sigma. The noise is calibrated per
  client over the most steps it can take in the run (every round), so a client that joins every
  round still ends within its budget. The ledger keeps one history per client.
- client-level (`privacy.mode=client`, DP-FedAvg): each round draws clients with probability
  q = clients per round / clients and adds noise to the sum of their clipped updates. One
  mechanism covers every client, so the ledger keeps one history, under `POPULATION`, and every
  client has spent the same epsilon.

The server's `PrivacyLedger` refuses a client (or the whole run) whose next round would cross the
target, and is saved with the checkpoint so a resumed run continues the count.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedft.config import PrivacyConfig, RunConfig
from fedft.errors import ConfigError
from fedft.federation.sampling import client_sample_rate, clients_per_round
from fedft.federation.training import local_steps

History = list[tuple[float, float, int]]


@contextmanager
def quiet_opacus() -> Iterator[None]:
    """Opacus warns when the best RDP order is the largest it tries (large noise, few steps); the
    bound is still valid, only looser, so the warning would only alarm a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


POPULATION = -1  # the ledger's key for client-level DP, whose one mechanism covers every client


def epsilon_for(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon that Opacus's accountant gives for a history of (sigma, q, steps) segments."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with quiet_opacus():
        return float(acc.get_epsilon(delta=delta))


def rdp_floor(delta: float) -> float:
    """The least epsilon the RDP accountant can report at `delta`, whatever the noise: its
    conversion from Renyi DP (Balle et al. 2020, as Opacus computes it) at zero Renyi divergence,
    over Opacus's orders."""
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    eps = -(np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(eps.min())


@lru_cache(maxsize=256)
def calibrate_noise(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    remedy: str = "take fewer rounds or steps",
) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance) that keeps `steps` steps at
    rate `sample_rate` within (epsilon, delta). Raises ConfigError when none can: at once where
    epsilon is below the RDP accountant's floor (Opacus's own search would climb the noise to a
    million first, for seconds). Cached: every client of a given size asks the same question
    every round."""
    if accountant == "rdp" and epsilon <= (floor := rdp_floor(delta)):
        raise ConfigError(
            f"privacy.epsilon={epsilon} cannot be met at delta={delta}: the RDP accountant "
            f"reports no less than {floor:.3g} with any noise; raise privacy.epsilon (or "
            "privacy.delta)"
        )
    try:
        with quiet_opacus():
            sigma = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01 * epsilon,
            )
    except ValueError as exc:
        raise ConfigError(
            f"privacy.epsilon={epsilon} cannot be met over {steps} steps at sampling rate "
            f"{sample_rate:.3g} ({exc}); raise privacy.epsilon, or {remedy}"
        ) from None
    return float(sigma)


@dataclass(frozen=True)
class MechanismPlan:
    """One subsampled Gaussian: the noise and rate of each step, the steps one round takes, the
    steps the run may take, and the expected size of a step's sample (the mean's denominator)."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int
    expected_batch: float


def _noise(p: PrivacyConfig, rate: float, steps: int, remedy: str) -> float:
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    assert p.epsilon is not None
    return calibrate_noise(p.epsilon, p.delta, rate, steps, p.accountant, remedy)


def plan_client(cfg: RunConfig, rows: int) -> MechanismPlan:
    """Sample-level DP of one client. Deterministic from the config and the client's row count,
    so the client, the server's pre-flight check and a resumed run all get the same numbers."""
    batch = min(cfg.train.batch_size, rows)
    rate = batch / rows
    per_round = local_steps(cfg.train, rows)
    planned = per_round * cfg.federation.rounds
    sigma = _noise(cfg.privacy, rate, planned, "take fewer rounds or local steps")
    return MechanismPlan(sigma, rate, per_round, planned, batch)


def plan_population(cfg: RunConfig) -> MechanismPlan:
    """Client-level DP: one step per round, each client drawn with the round's sampling rate."""
    rate = client_sample_rate(cfg.federation)
    rounds = cfg.federation.rounds
    expected = clients_per_round(cfg.federation)
    remedy = "take fewer rounds, or more clients (client-level DP needs many)"
    return MechanismPlan(_noise(cfg.privacy, rate, rounds, remedy), rate, 1, rounds, expected)


def _refuse_overspending_round(p: PrivacyConfig, plan: MechanismPlan, who: str) -> None:
    if p.epsilon is None:
        return
    one_round = epsilon_for(
        [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], p.delta, p.accountant
    )
    if one_round > p.epsilon:
        raise ConfigError(
            f"privacy: {who} would spend epsilon={one_round:.3g} in one round with "
            f"noise_multiplier={plan.noise_multiplier}, above privacy.epsilon={p.epsilon}; "
            "raise the noise multiplier or leave it unset"
        )


def check_budgets(cfg: RunConfig, rows_per_client: list[int]) -> list[MechanismPlan]:
    """Refuse, before training, a privacy config that cannot be met even for one round."""
    p = cfg.privacy
    if p.mode == "client":
        try:
            plan = plan_population(cfg)
        except ConfigError as exc:
            raise ConfigError(
                f"client-level DP with {cfg.federation.clients} clients: {exc}"
            ) from None
        _refuse_overspending_round(p, plan, "client-level DP")
        return [plan]
    plans = []
    for client, rows in enumerate(rows_per_client):
        try:
            plan = plan_client(cfg, rows)
        except ConfigError as exc:
            raise ConfigError(f"client {client} ({rows} rows): {exc}") from None
        _refuse_overspending_round(p, plan, f"client {client} ({rows} rows)")
        plans.append(plan)
    return plans


class PrivacyLedger:
    """Per-client accountant histories; the budget check before a client is asked to train.

    Each client's epsilon is kept until its history changes: a round then costs an accountant
    call per client that took part, not one per client that ever did (at 100 clients over 4
    rounds the server's seconds a round had grown 4x from recomputing them all)."""

    def __init__(self, cfg: PrivacyConfig):
        self.cfg = cfg
        self.histories: dict[int, History] = {}
        self.last: dict[int, tuple[float, float, int]] = {}
        self._epsilons: dict[int, float] = {}

    def record(self, client: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        history = self.histories.setdefault(client, [])
        if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
            sigma, q, n = history[-1]
            history[-1] = (sigma, q, n + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))
        self.last[client] = (noise_multiplier, sample_rate, steps)
        self._epsilons.pop(client, None)

    def epsilon(self, client: int) -> float:
        if client not in self._epsilons:
            history = self.histories.get(client, [])
            self._epsilons[client] = epsilon_for(history, self.cfg.delta, self.cfg.accountant)
        return self._epsilons[client]

    def can_afford(self, client: int) -> bool:
        """Whether another round like the client's last one keeps it within the target."""
        if self.cfg.epsilon is None or client not in self.last:
            return True
        sigma, q, steps = self.last[client]
        history = [*self.histories[client], (sigma, q, steps)]
        return epsilon_for(history, self.cfg.delta, self.cfg.accountant) <= self.cfg.epsilon

    def spent(self) -> dict[int, float]:
        return {c: self.epsilon(c) for c in sorted(self.histories)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": {str(c): [list(h) for h in hist] for c, hist in self.histories.items()},
            "last": {str(c): list(v) for c, v in self.last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.histories = {
            int(c): [(float(s), float(q), int(n)) for s, q, n in hist]
            for c, hist in state.get("histories", {}).items()
        }
        self.last = {
            int(c): (float(s), float(q), int(n)) for c, (s, q, n) in state.get("last", {}).items()
        }
        self._epsilons = {}
