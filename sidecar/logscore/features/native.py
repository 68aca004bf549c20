"""The compiled featurizer (``logscore.features._native``, built from ``_native.c`` at install)
and the switch between it and the pure-Python reference.

Both give bit-identical features (tests/test_native.py compares them on every converter).
The compiled one is used when it was built, unless ``LOGSCORE_PURE_PYTHON=1`` is set in the
environment or a Featurizer is made with ``native=False`` (tests, benchmarks). When it is
missing, the Python path runs and the log says so once.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

try:
    from . import _native
except ImportError as error:  # not built: no compiler or headers at install time
    _native = None
    _IMPORT_ERROR: Optional[str] = str(error)
else:
    _IMPORT_ERROR = None

FORCE_PYTHON_ENV = "LOGSCORE_PURE_PYTHON"
_announced = False


def built() -> bool:
    return _native is not None


def status() -> str:
    """How features are computed in this process, in a few words (logs, `logscore inspect`)."""
    if _native is None:
        return "python (the compiled featurizer is not built; see scripts/setup.sh)"
    if os.environ.get(FORCE_PYTHON_ENV) == "1":
        return f"python ({FORCE_PYTHON_ENV}=1)"
    return "compiled"


def module(requested: Optional[bool] = None):
    """The compiled module to use, or None for the Python path. ``requested``: True/False
    forces a path (True fails when it is not built), None follows the environment."""
    global _announced
    if requested is False:
        return None
    if requested is True:
        if _native is None:
            raise ImportError(f"the compiled featurizer is not built: {_IMPORT_ERROR}")
        return _native
    if os.environ.get(FORCE_PYTHON_ENV) == "1":
        return None
    if _native is None and not _announced:
        _announced = True
        logging.getLogger("logscore").warning(
            "featurizer: the compiled featurizer is not built (%s); the pure-Python one runs, "
            "same features, several times slower. Run scripts/setup.sh (it installs gcc and "
            "python3-dev) to build it", _IMPORT_ERROR)
    return _native
