"""Pretraining runs: the config of `alice3d-pretrain` and the function that runs it."""
