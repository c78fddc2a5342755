"""Constants shared by test modules (``from helpers import TINY_VIT``: tests/ is on sys.path
because tests/conftest.py lives there)."""

# A 2-layer ViT narrow enough for CPU unit tests; UNETR-style builders fix the depth at 12 and
# take only the widths (TINY_VIT_WIDTH).
TINY_VIT = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 2}
TINY_VIT_WIDTH = {k: v for k, v in TINY_VIT.items() if k != "num_layers"}


def write_tiny_best_run(run, step: int = 1):
    """A fine-tuning run folder holding the best.pt of a tiny btcv UNETR (8 mm, ROI 32x32x16) whose
    output weights are scaled up, so its argmax gives several labels rather than the largest bias."""
    import torch

    from alice3d.finetune.config import ModelConfig
    from alice3d.finetune.models import build_network, network_spec
    from alice3d.finetune.objectives import SegmentationTask
    from alice3d.finetune.tasks import resolve_task
    from alice3d.train.checkpoint import atomic_save

    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=(32, 32, 16))
    spec = network_spec(ModelConfig(name="unetr", hidden_size=48, mlp_dim=96, num_heads=4), task)
    torch.manual_seed(0)
    obj = SegmentationTask(build_network(spec), spec, task,
                           extra_metadata={"inference": {"sw_batch_size": 2, "sw_overlap": 0.25, "sw_mode": "constant"}})
    with torch.no_grad():
        obj.network.out.conv.conv.weight.mul_(20.0)
    atomic_save({"metadata": {"kind": "alice3d-best", **obj.metadata()}, "state_dict": obj.state_dict(), "step": step,
                 "metrics": {}}, run / "best.pt")
    return run
