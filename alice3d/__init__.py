"""alice3d: self-supervised pretraining for 3D medical imaging on MONAI."""
__version__ = "0.1.0"
