"""The very deep VAE: residual blocks, bottom-up encoder, top-down decoder, output likelihood."""

from .vae import VeryDeepVAE, ModelOutput

__all__ = ["VeryDeepVAE", "ModelOutput"]
