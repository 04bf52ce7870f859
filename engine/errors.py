"""The one error type the launcher turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, data path, checkpoint); str(e) names the problem and the way out."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""
