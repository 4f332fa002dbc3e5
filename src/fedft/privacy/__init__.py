"""Differential privacy: calibration of the noise from a target (epsilon, delta), and the ledger
that counts what each client has spent with an Opacus accountant."""

from fedft.privacy.accounting import (
    POPULATION,
    MechanismPlan,
    PrivacyLedger,
    calibrate_noise,
    check_budgets,
    epsilon_for,
    plan_client,
    plan_population,
)

__all__ = [
    "MechanismPlan",
    "POPULATION",
    "PrivacyLedger",
    "calibrate_noise",
    "check_budgets",
    "epsilon_for",
    "plan_client",
    "plan_population",
]
