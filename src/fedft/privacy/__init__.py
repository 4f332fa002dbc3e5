"""Differential privacy: calibration of the noise from a target (epsilon, delta), and the ledger
that counts what each client has spent with an Opacus accountant."""

from fedft.privacy.accounting import (
    ClientPlan,
    PrivacyLedger,
    calibrate_noise,
    check_budgets,
    epsilon_for,
    plan_client,
)

__all__ = [
    "ClientPlan",
    "PrivacyLedger",
    "calibrate_noise",
    "check_budgets",
    "epsilon_for",
    "plan_client",
]
