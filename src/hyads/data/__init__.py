"""Image decoding, dataset layouts and synthetic data."""

from .io import IMAGE_SUFFIXES, load_image, load_mask
from .datasets import Dataset, Sample, load_dataset

__all__ = ["IMAGE_SUFFIXES", "load_image", "load_mask", "Dataset", "Sample", "load_dataset"]
