"""Data: discovery, loading, augmentation and the built-in phantom population."""
