"""Privacy accounting shared by every DP mechanism in fedft.

A client's mechanism is a subsampled Gaussian: each local step draws a Poisson batch with rate
q = batch_size / rows and adds noise with multiplier sigma. The noise is calibrated per client,
from the target (epsilon, delta), over the most steps the client can take in the run (every round),
so a client that joins every round still ends within its budget. The server's `PrivacyLedger`
counts what each client really took with an Opacus accountant (RDP or PRV), refuses a client whose
next round would cross the target, and is saved with the checkpoint so a resumed run continues the
count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedft.config import PrivacyConfig, RunConfig
from fedft.errors import ConfigError
from fedft.federation.training import local_steps

History = list[tuple[float, float, int]]


def epsilon_for(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon that Opacus's accountant gives for a history of (sigma, q, steps) segments."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance) that keeps `steps` steps at
    rate `sample_rate` within (epsilon, delta). Raises ConfigError when none can."""
    try:
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
            f"{sample_rate:.3g} ({exc}); raise privacy.epsilon, or take fewer rounds or steps"
        ) from None
    return float(sigma)


@dataclass(frozen=True)
class ClientPlan:
    """One client's mechanism: what it uses every step, and how many steps it may take."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_steps: int
    expected_batch: float


def plan_client(cfg: RunConfig, rows: int) -> ClientPlan:
    """Deterministic from the config and the client's row count, so the client, the server's
    pre-flight check and a resumed run all get the same numbers."""
    p = cfg.privacy
    batch = min(cfg.train.batch_size, rows)
    rate = batch / rows
    per_round = local_steps(cfg.train, rows)
    planned = per_round * cfg.federation.rounds
    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
    else:
        assert p.epsilon is not None
        sigma = calibrate_noise(p.epsilon, p.delta, rate, planned, p.accountant)
    return ClientPlan(sigma, rate, per_round, planned, batch)


def check_budgets(cfg: RunConfig, rows_per_client: list[int]) -> list[ClientPlan]:
    """Refuse, before training, a privacy config that some client cannot meet even for one round."""
    p = cfg.privacy
    plans = []
    for client, rows in enumerate(rows_per_client):
        try:
            plan = plan_client(cfg, rows)
        except ConfigError as exc:
            raise ConfigError(f"client {client} ({rows} rows): {exc}") from None
        if p.epsilon is not None:
            one_round = epsilon_for(
                [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)],
                p.delta,
                p.accountant,
            )
            if one_round > p.epsilon:
                raise ConfigError(
                    f"privacy: client {client} ({rows} rows) would spend epsilon={one_round:.3g} in "
                    f"one round with noise_multiplier={plan.noise_multiplier}, above "
                    f"privacy.epsilon={p.epsilon}; raise the noise multiplier or leave it unset"
                )
        plans.append(plan)
    return plans


class PrivacyLedger:
    """Per-client accountant histories; the budget check before a client is asked to train."""

    def __init__(self, cfg: PrivacyConfig):
        self.cfg = cfg
        self.histories: dict[int, History] = {}
        self.last: dict[int, tuple[float, float, int]] = {}

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

    def epsilon(self, client: int) -> float:
        return epsilon_for(self.histories.get(client, []), self.cfg.delta, self.cfg.accountant)

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
