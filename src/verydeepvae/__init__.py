"""verydeepvae: hierarchical very deep VAEs for 3D brain MRI."""

import os

# OpenMP threads that spin while waiting make CPU training up to 10x slower as soon as another
# process holds a core (measured on 2 cores: 12 s/step spinning vs 1.6 s/step passive for the demo
# preset).  Must be set before torch loads its OpenMP runtime; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0.dev0"
