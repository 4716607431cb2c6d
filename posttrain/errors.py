"""User-facing errors: raised for bad input or configuration, printed as one line without a traceback."""


class PosttrainError(Exception):
    """An error the user can fix; the message names the file, row or key and how to fix it."""


class DataError(PosttrainError):
    """A dataset file or row is malformed."""


class ConfigError(PosttrainError):
    """A configuration value is missing, unknown or inconsistent."""


class DiskFullError(PosttrainError):
    """A write failed for lack of space (ENOSPC / EDQUOT): the message names what, nothing half-written is kept."""
