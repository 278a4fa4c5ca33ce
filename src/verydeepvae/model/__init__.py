"""The very deep VAE: residual blocks, bottom-up encoder, top-down decoder, output likelihood."""

from .vae import ModelOutput, VeryDeepVAE, autocast_for

__all__ = ["VeryDeepVAE", "ModelOutput", "autocast_for"]
