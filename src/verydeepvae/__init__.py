"""verydeepvae: hierarchical very deep VAEs for 3D brain MRI."""

__version__ = "0.2.0.dev0"
