"""Errors raised while reading raw data or building samples."""


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the config key behind it."""


class DataWarning(UserWarning):
    """Data that can be read but weakens the results (no titles, imbalanced labels); the data
    stage also lists every such warning in its ``summary.json`` (``warnings``)."""
