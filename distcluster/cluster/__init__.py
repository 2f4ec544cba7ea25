"""Ray: Ray Train's TorchTrainer (fixed and elastic groups, restarts), Ray Tune sweeps and their
search spaces.
"""
