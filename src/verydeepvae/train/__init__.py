"""Training: optimisation policy, checkpoints, distributed helpers and the loop itself."""
