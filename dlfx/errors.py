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


class NonFiniteError(DlfxError):
    """Training produced a non-finite loss or gradient and the nan policy says stop."""
