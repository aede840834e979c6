"""The errors lomo_trainer raises for a user to read: one line naming the key or file and the fix. A leaf module."""


class ConfigError(ValueError):
    """A bad or contradictory configuration: the message names the key(s) and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: the message names the file and what to do."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or non-finite weights about to be saved."""


class SaveFailed(RuntimeError):
    """A checkpoint or the final model could not be written (a full disk, say): the unfinished folder was removed and
    the checkpoints written before are kept."""


class Interrupted(SystemExit):
    """SIGTERM or Ctrl-C (SIGINT) stopped the run; ``code`` is 128 + the signal, ``message`` one line saying what
    was saved."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message
