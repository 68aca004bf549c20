"""Build steps pyproject.toml cannot express: the shipped models and OpenAPI document
become package data (logscore/data), so an installed logscore serves its default model; the
compiled featurizer (logscore.features._native) is built from C. It is optional: without a C
compiler and Python's headers the install still succeeds and the pure-Python featurizer runs
(scripts/setup.sh installs gcc and python3-dev on Debian)."""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithData(build_py):
    def run(self):
        super().run()
        data = Path(self.build_lib) / "logscore" / "data"
        (data / "models").mkdir(parents=True, exist_ok=True)
        for model in sorted((ROOT / "models").glob("*")):
            if model.suffix in (".onnx", ".md"):
                shutil.copy2(model, data / "models" / model.name)
        shutil.copy2(ROOT / "docs" / "openapi.json", data / "openapi.json")


NATIVE = Extension(
    "logscore.features._native", ["sidecar/logscore/features/_native.c"],
    # NOTE: no contraction of a*b+c into one fused instruction: weights must round exactly
    # as numpy's float32 products do.
    extra_compile_args=["-O2", "-ffp-contract=off", "-std=c11"],
    optional=True)

setup(cmdclass={"build_py": BuildWithData}, ext_modules=[NATIVE])
