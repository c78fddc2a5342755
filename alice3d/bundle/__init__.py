"""MONAI bundle export of fine-tuning runs (``alice3d-export``); see :mod:`alice3d.bundle.export`."""
