"""reflect-tune: Selective Reflection-Tuning, from raw instruction data to a better small model.

Importing this package is cheap: torch and transformers load only when a function needs them.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("reflect-tune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from reflect_tune.errors import DataError, ModelError, ReflectTuneError  # noqa: E402

__all__ = ["__version__", "DataError", "ModelError", "ReflectTuneError"]
