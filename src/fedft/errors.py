"""User-facing errors.

A `FedftError` is bad input that the user can fix: the CLI prints its message on one line and
exits with code 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class FedftError(Exception):
    """Bad input: the message says what was wrong and how to fix it."""


class ConfigError(FedftError):
    """A config field has a wrong name or value."""


class DataError(FedftError):
    """The data cannot be loaded or does not fit the run."""


class ModelError(FedftError):
    """The model cannot be loaded or does not fit the method."""


class RunStopped(FedftError):
    """The run could not go on (for example too few clients answered); the last checkpoint holds."""


class BudgetSpent(RunStopped):
    """Every client the round needs has spent its privacy budget: the run ends where it is."""
