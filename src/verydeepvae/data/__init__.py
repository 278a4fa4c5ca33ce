"""Data: discovery, loading, augmentation and the built-in phantom population.

The names below are imported lazily, so worker processes that only preprocess NIfTI files (and
``verydeepvae.data.phantom``) do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DataBundle", "VolumeDataset", "build_datasets", "write_pipeline_preview"]

if TYPE_CHECKING:
    from .datasets import DataBundle, VolumeDataset, build_datasets
    from .pipeline_preview import write_pipeline_preview


def __getattr__(name: str) -> Any:
    if name in ("DataBundle", "VolumeDataset", "build_datasets"):
        from . import datasets

        return getattr(datasets, name)
    if name == "write_pipeline_preview":
        from .pipeline_preview import write_pipeline_preview

        return write_pipeline_preview
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
