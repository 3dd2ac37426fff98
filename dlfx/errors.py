"""User-facing errors: the CLI prints these as one line and exits 2."""


class DlfxError(Exception):
    """Base class for errors a user can cause (bad config, data, checkpoint, weights)."""


class ConfigError(DlfxError):
    """A config file, key or value is wrong."""


class DataError(DlfxError):
    """A data set is missing, malformed or misconfigured."""


class CheckpointError(DlfxError):
    """No valid checkpoint could be found, read or written."""


class TransferError(DlfxError):
    """Pretrained weights do not fit the model."""


class WorkdirError(DlfxError):
    """A run folder's files cannot be written (a full disk, lost permissions)."""


class NonFiniteError(DlfxError):
    """Training produced a non-finite loss or gradient and the nan policy says stop."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of its message` (cut at `limit` characters): another library's error as part of one
    error line."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    line = line[:limit] + " ..." if len(line) > limit else line
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
