"""Featurization shared by training and serving."""

from .batch import FeatureBatch
from .featurizer import DEFAULT_SPECS, Featurizer, load_spec

__all__ = ["DEFAULT_SPECS", "FeatureBatch", "Featurizer", "load_spec"]
