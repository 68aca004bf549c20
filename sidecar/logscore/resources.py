"""Files logscore ships beside its code: the default models and the OpenAPI document.

An installed package carries them under ``logscore/data`` (setup.py copies them in at
build time); a checkout or an editable install reads them where the repository keeps them.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
CHECKOUT = Path(__file__).resolve().parents[2]


def _shipped(in_package: str, in_checkout: str) -> Path:
    packaged = PACKAGE_DATA / in_package
    return packaged if packaged.exists() else CHECKOUT / in_checkout


def default_models_dir() -> Path:
    """The shipped models (models/ of the repository)."""
    return _shipped("models", "models")


def openapi_path() -> Path:
    """The OpenAPI document of the HTTP surface (docs/openapi.json of the repository)."""
    return _shipped("openapi.json", "docs/openapi.json")
