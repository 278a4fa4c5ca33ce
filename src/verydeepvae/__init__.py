"""verydeepvae: hierarchical very deep VAEs for 3D brain MRI.

The Python API (docs/python-api.md)::

    import verydeepvae
    model = verydeepvae.load("runs/demo")          # a run folder or a checkpoint file
    volumes = model.sample(4, temperature=0.8)     # volumes.data: (4, R, R, R) in [0, 1]
    volumes.save("samples/")                       # NIfTI, with each volume's affine

Importing the package is cheap and changes nothing in the process (torch loads on first use of
the API; the command line's OpenMP setting is applied by the command line only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"
__all__ = ["Model", "Volumes", "__version__", "fit", "load", "save_nifti"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Model, Volumes, fit, load, save_nifti


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (so ``import verydeepvae`` does not load torch)."""
    if name in ("Model", "Volumes", "fit", "load", "save_nifti"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'verydeepvae' has no attribute {name!r}")
