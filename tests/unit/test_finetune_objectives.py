"""SegmentationTask losses: DiceCE, nnFormer deep supervision; optimizer schedules; model specs."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from alice3d.config import ConfigError
from alice3d.finetune.config import FinetuneConfig, ModelConfig
from alice3d.finetune.models import build_network, network_spec
from alice3d.finetune.objectives import SegmentationTask, deep_supervision_weights, resize_label
from alice3d.finetune.tasks import resolve_task
from alice3d.finetune.train import build_optimization, poly_warmup_factor


def test_deep_supervision_weights():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(2, (3.0, 1.0)) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="2 values but the network has 3"):
        deep_supervision_weights(3, (1.0, 1.0))


def test_resize_label_nearest_keeps_ids():
    lab = torch.zeros(1, 1, 8, 8, 4)
    lab[0, 0, :4, :4, :2] = 5
    small = resize_label(lab, (4, 4, 2))
    assert small.shape == (1, 1, 4, 4, 2)
    assert set(small.unique().tolist()) == {0.0, 5.0}
    assert small[0, 0, :2, :2, :1].eq(5).all() and small[0, 0, 2:, 2:, 1:].eq(0).all()


def test_nnformer_deep_supervision_loss_is_the_weighted_sum():
    task = resolve_task("btcv", roi=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    spec = network_spec(ModelConfig(name="nnformer"), task)
    torch.manual_seed(0)
    net = build_network(spec)
    obj = SegmentationTask(net, spec, task)
    x = torch.rand(1, 1, 32, 32, 16)
    label = torch.randint(0, task.num_classes, (1, 1, 32, 32, 16)).float()
    obj.train()
    outs = net(x)
    assert isinstance(outs, list) and [tuple(o.shape[2:]) for o in outs] == [(32, 32, 16), (16, 16, 8), (8, 8, 4)]
    torch.manual_seed(1)
    out = obj({"image": x, "label": label})
    ref = DiceCELoss(to_onehot_y=True, softmax=True)
    with torch.no_grad():
        torch.manual_seed(1)
        outs = net(x)
        terms = [ref(o, resize_label(label, o.shape[2:])) for o in outs]
    expected = sum(w * t for w, t in zip([4 / 7, 2 / 7, 1 / 7], terms))
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    for k, t in enumerate(terms):
        assert torch.allclose(out[f"loss_ds{k}"], t, atol=1e-5)
    out["loss"].backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.heads)
    obj.eval()
    with torch.no_grad():
        assert obj.logits(x).shape == (1, task.num_classes, 32, 32, 16)


def test_single_output_loss_matches_monai():
    task = resolve_task("btcv", roi=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    logits = torch.randn(1, task.num_classes, 8, 8, 4)
    label = torch.randint(0, task.num_classes, (1, 1, 8, 8, 4)).float()
    obj = SegmentationTask(torch.nn.Identity(), {"name": "identity", "args": {}}, task)
    got = obj.loss(logits, label)["loss"]
    assert torch.allclose(got, DiceCELoss(to_onehot_y=True, softmax=True)(logits, label))


def test_roi_must_fit_the_network():
    task = resolve_task("btcv", roi=(48, 48, 32))
    with pytest.raises(ConfigError, match=r"multiple of \[32, 32, 32\]"):
        network_spec(ModelConfig(name="swin_unetr"), task)
    with pytest.raises(ConfigError, match=r"multiple of \[32, 32, 16\]"):
        network_spec(ModelConfig(name="nnformer"), task)
    assert network_spec(ModelConfig(name="unetr"), task)["args"]["img_size"] == [48, 48, 32]


def test_poly_and_sgd_optimization():
    assert poly_warmup_factor(0, 4, 20, 0.9) == pytest.approx(0.25)
    assert poly_warmup_factor(4, 4, 20, 0.9) == pytest.approx(1.0)
    assert poly_warmup_factor(12, 4, 20, 0.9) == pytest.approx(0.5**0.9)
    assert poly_warmup_factor(20, 4, 20, 0.9) == pytest.approx(0.0)
    cfg = FinetuneConfig()
    cfg.train.optimizer, cfg.train.momentum, cfg.optim.schedule = "sgd", 0.99, "poly"
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps = 0.01, 2, 10
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimization(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.99 and opt.defaults["nesterov"]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.01 * (1 / 8) ** 0.9)
    assert build_optimization(FinetuneConfig(), model) == (None, None)  # trainer's AdamW + cosine


def test_channels_last_changes_speed_not_results():
    task = resolve_task("btcv", roi=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    spec = network_spec(ModelConfig(name="unetr", hidden_size=48, mlp_dim=96, num_heads=4), task)
    torch.manual_seed(0)
    obj = SegmentationTask(build_network(spec), spec, task).eval()
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        ref = obj.logits(x)
        obj.use_channels_last()
        got = obj.logits(x)
    assert obj.network.vit.patch_embedding.patch_embeddings.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(got, ref, atol=1e-4)


def _small_unetr() -> SegmentationTask:
    task = resolve_task("btcv", roi=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    spec = network_spec(ModelConfig(name="unetr", hidden_size=48, mlp_dim=96, num_heads=4), task)
    return SegmentationTask(build_network(spec), spec, task)


def test_encoder_lr_scale_and_layer_decay_by_hand():
    obj = _small_unetr()
    cfg = FinetuneConfig()
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps = 1e-3, 0, 10
    cfg.optim.encoder_lr_scale, cfg.optim.layer_decay = 0.5, 0.8
    opt, _ = build_optimization(cfg, obj)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(obj.named_parameters())
    # 12 blocks: patch embedding depth 0, block i depth i + 1, final norm depth 13 = full encoder scale.
    expected = {
        "network.vit.patch_embedding.patch_embeddings.weight": 1e-3 * 0.5 * 0.8**13,
        "network.vit.patch_embedding.position_embeddings": 1e-3 * 0.5 * 0.8**13,
        "network.vit.blocks.0.attn.qkv.weight": 1e-3 * 0.5 * 0.8**12,
        "network.vit.blocks.11.mlp.linear1.weight": 1e-3 * 0.5 * 0.8,
        "network.vit.norm.weight": 1e-3 * 0.5,
        "network.encoder2.blocks.1.0.conv.weight": 1e-3,  # decoder side: full rate
        "network.out.conv.conv.weight": 1e-3,
    }
    for name, lr in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged rate is the base rate
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    # Weight decay still skips norms, biases and position embeddings inside scaled groups.
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(params["network.vit.patch_embedding.position_embeddings"])] == 0.0
    assert wd_of[id(params["network.vit.blocks.3.norm1.weight"])] == 0.0
    assert wd_of[id(params["network.vit.blocks.3.attn.qkv.weight"])] == cfg.train.weight_decay


def test_zero_encoder_lr_freezes_the_encoder_only():
    obj = _small_unetr()
    cfg = FinetuneConfig()
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps = 1e-2, 0, 10
    cfg.optim.encoder_lr_scale = 0.0
    opt, sched = build_optimization(cfg, obj)
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    x, y = torch.rand(1, 1, 32, 32, 16), torch.randint(0, 14, (1, 1, 32, 32, 16)).float()
    for _ in range(2):
        opt.zero_grad()
        obj.loss(obj.network(x), y)["loss"].backward()
        opt.step()
        sched.step()
    moved = {n for n, p in obj.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(not n.startswith("network.vit.") for n in moved)
    assert "network.out.conv.conv.weight" in moved


def test_layer_decay_needs_a_vit_and_valid_values():
    cfg = FinetuneConfig()
    cfg.optim.layer_decay = 1.5
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        cfg.validate()
    cfg.optim.layer_decay, cfg.optim.encoder_lr_scale = 1.0, -0.1
    with pytest.raises(ConfigError, match="optim.encoder_lr_scale"):
        cfg.validate()
    task = resolve_task("btcv", roi=(64, 64, 64), spacing=(8.0, 8.0, 8.0))
    spec = network_spec(ModelConfig(name="swin_unetr", feature_size=12), task)
    swin = SegmentationTask(build_network(spec), spec, task)
    cfg = FinetuneConfig()
    cfg.optim.layer_decay = 0.75
    with pytest.raises(ConfigError, match=r"optim.layer_decay: applies to ViT encoders.*SwinUNETR.swinViT"):
        build_optimization(cfg, swin)
    cfg.optim.layer_decay, cfg.optim.encoder_lr_scale = 1.0, 0.1
    opt, _ = build_optimization(cfg, swin)
    assert sorted({g["initial_lr"] for g in opt.param_groups}) == pytest.approx([0.1 * cfg.train.lr, cfg.train.lr])
