"""The one error type the launcher turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, data path, checkpoint); str(e) names the problem and the way out."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error is re-raised in the main process as type(e)(text), where the text is
        # "Caught ... Original Traceback ..." ending in "module.Type: message"; the message is what the user needs.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class NonFiniteLoss(UserError, FloatingPointError):
    """A NaN/inf loss (or weights) on some rank; every rank raises it at the same step."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message is meant for the user as is."""


class DataError(UserError):
    """A data set that cannot be found or read; the message names the path and the way out."""
