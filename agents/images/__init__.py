"""Image generation with the flowpolicy core: datasets, a feature classifier (FD metric, reward), training.

``run(cfg)`` is the entry point that ``python train.py task=digits stage=image`` calls.
"""

from .classifier import (
    FrechetScorer,
    ImageClassifier,
    frechet_distance,
    gaussian_fit,
    load_or_train_classifier,
    train_classifier,
)
from .data import (
    ImageData,
    denormalize,
    load_cifar10,
    load_dataset,
    load_digits,
    load_image_folder,
    normalize,
)
from .trainer import METHODS, TrainedModel, image_grid, load_generator, run, save_checkpoint

__all__ = [
    "FrechetScorer",
    "ImageClassifier",
    "frechet_distance",
    "gaussian_fit",
    "load_or_train_classifier",
    "train_classifier",
    "ImageData",
    "denormalize",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "normalize",
    "METHODS",
    "TrainedModel",
    "image_grid",
    "load_generator",
    "run",
    "save_checkpoint",
]
