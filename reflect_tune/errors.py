"""The errors a user can cause. The CLI prints them as one line and exits with code 2."""


class ReflectTuneError(Exception):
    """Bad input or configuration: reported as `error: <message>`, no traceback, exit code 2."""

    exit_code = 2


class DataError(ReflectTuneError):
    """A data file cannot be read or has a record that does not fit its shape."""


class ModelError(ReflectTuneError):
    """A model or tokenizer cannot be found or loaded."""
