"""Data: discovery, loading, augmentation and the built-in phantom population."""

from .datasets import DataBundle, VolumeDataset, build_datasets
from .pipeline_preview import write_pipeline_preview

__all__ = ["DataBundle", "VolumeDataset", "build_datasets", "write_pipeline_preview"]
