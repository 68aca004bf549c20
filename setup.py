"""Build steps pyproject.toml cannot express: the shipped models and OpenAPI document
become package data (logscore/data), so an installed logscore serves its default model."""

import shutil
from pathlib import Path

from setuptools import setup
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


setup(cmdclass={"build_py": BuildWithData})
