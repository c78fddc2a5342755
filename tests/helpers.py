"""Constants shared by test modules (``from helpers import TINY_VIT``: tests/ is on sys.path
because tests/conftest.py lives there)."""

# A 2-layer ViT narrow enough for CPU unit tests; UNETR-style builders fix the depth at 12 and
# take only the widths (TINY_VIT_WIDTH).
TINY_VIT = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 2}
TINY_VIT_WIDTH = {k: v for k, v in TINY_VIT.items() if k != "num_layers"}
