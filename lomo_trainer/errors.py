"""The errors lomo_trainer raises for a user to read: one line naming the key or file and the fix. A leaf module."""


class ConfigError(ValueError):
    """A bad or contradictory configuration: the message names the key(s) and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: the message names the file and what to do."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or non-finite weights about to be saved."""
