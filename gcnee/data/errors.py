"""Errors raised while reading raw data or building samples."""


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the config key behind it."""
