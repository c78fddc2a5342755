"""Weight transfer encoder.pt -> UNETR.vit / SwinUNETR.swinViT / NNFormer.encoder / classifier."""

from __future__ import annotations

import pytest
import torch

from alice3d.encoders.files import encoder_file_metadata, load_encoder, save_encoder
from alice3d.encoders.nnformer import NNFormerEncoder
from alice3d.encoders.swin import SwinEncoder
from alice3d.encoders.vit import ViTEncoder
from alice3d.finetune.config import ModelConfig
from alice3d.finetune.models import EncoderMismatchError, build_network, encoder_module, network_spec
from alice3d.finetune.tasks import resolve_task
from alice3d.finetune.transfer import POS_EMBED_KEY, transfer_encoder

VIT_ARGS = dict(img_size=[32, 32, 16], patch_size=16, hidden_size=48, mlp_dim=96, num_heads=4, num_layers=12)
SWIN_ARGS = dict(feature_size=12, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=4)
NNF_ARGS = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_sizes=[4, 4, 8, 4],
                patch_stride=[4, 4, 2])


def _task(roi, name="btcv"):
    return resolve_task(name, roi=roi, spacing=(4.0, 4.0, 4.0) if name != "classification" else ())


def _encoder_file(tmp_path, arch):
    torch.manual_seed(1)
    enc = {"vit": lambda: ViTEncoder(**VIT_ARGS), "swin": lambda: SwinEncoder(**SWIN_ARGS),
           "nnformer": lambda: NNFormerEncoder(**NNF_ARGS)}[arch]()
    # Distinct, non-default values everywhere (norms included) so a missed key shows.
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _save(tmp_path / f"{arch}.pt", enc), enc


def _save(path, enc, state_dict=None):
    """An encoder.pt exactly as alice3d-pretrain writes it (arch_args = the encoder's metadata())."""
    meta = encoder_file_metadata(enc.metadata(), crop_size=[32, 32, 16], spacing=[2.0, 2.0, 2.0], method="test")
    return save_encoder(path, enc.state_dict() if state_dict is None else state_dict, meta)


def _loaded_network(path, task, model_name=""):
    sd, meta = load_encoder(path)
    spec = network_spec(ModelConfig(name=model_name), task, meta, str(path))
    torch.manual_seed(0)
    net = build_network(spec)
    return net, spec, sd, meta


@pytest.mark.parametrize("arch,roi,model", [
    ("vit", (32, 32, 16), "unetr"),
    ("swin", (64, 32, 32), "swin_unetr"),
    ("nnformer", (32, 32, 16), "nnformer"),
])
def test_transfer_loads_every_key_and_changes_outputs(tmp_path, arch, roi, model):
    path, enc = _encoder_file(tmp_path, arch)
    task = _task(roi)
    net, spec, sd, meta = _loaded_network(path, task)
    assert spec["name"] == model
    x = torch.rand(1, 1, *roi)
    net.eval()
    with torch.no_grad():
        before = net(x)
    report = transfer_encoder(net, spec, sd, meta, path)
    assert report.ok and not report.adapted
    assert sorted(report.loaded) == sorted(sd)  # every encoder tensor landed
    target, _ = encoder_module(net, spec)
    got = target.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    with torch.no_grad():
        after = net(x)
    assert after.shape == (1, task.num_classes, *roi)
    assert not torch.allclose(before, after)


def test_vit_position_embedding_is_interpolated_when_the_grid_differs(tmp_path):
    path, _ = _encoder_file(tmp_path, "vit")  # grid 2x2x1
    task = _task((32, 32, 32))  # grid 2x2x2
    net, spec, sd, meta = _loaded_network(path, task)
    report = transfer_encoder(net, spec, sd, meta, path)
    assert report.adapted == {POS_EMBED_KEY: ([1, 4, 48], [1, 8, 48])}
    pe = net.vit.patch_embedding.position_embeddings.detach()
    # grid (2, 2, 1) -> (2, 2, 2): every new z-slice equals the single old one
    old = sd[POS_EMBED_KEY].reshape(2, 2, 1, 48)
    new = pe.reshape(2, 2, 2, 48)
    assert torch.allclose(new[:, :, 0], old[:, :, 0], atol=1e-6)
    assert torch.allclose(new[:, :, 1], old[:, :, 0], atol=1e-6)
    assert "shape-adapted: 1" in report.format()


def test_constant_position_embedding_stays_constant(tmp_path):
    enc = ViTEncoder(**VIT_ARGS)
    sd = enc.state_dict()
    sd[POS_EMBED_KEY] = torch.full_like(sd[POS_EMBED_KEY], 0.375)
    path = _save(tmp_path / "c.pt", enc, sd)
    task = _task((48, 64, 32))  # grid 3x4x2 from 2x2x1
    net, spec, sd, meta = _loaded_network(path, task)
    transfer_encoder(net, spec, sd, meta, path)
    pe = net.vit.patch_embedding.position_embeddings
    assert pe.shape == (1, 24, 48)
    assert torch.allclose(pe, torch.full_like(pe, 0.375))


def test_encoder_of_another_family_is_refused(tmp_path):
    path, _ = _encoder_file(tmp_path, "vit")
    with pytest.raises(EncoderMismatchError, match="fits model 'unetr', not model.name='swin_unetr'"):
        _loaded_network(path, _task((64, 32, 32)), "swin_unetr")


def test_vit_that_cannot_fit_unetr_is_refused(tmp_path):
    path = _save(tmp_path / "v6.pt", ViTEncoder(**dict(VIT_ARGS, num_layers=6)))
    with pytest.raises(EncoderMismatchError, match="6 layers"):
        _loaded_network(path, _task((32, 32, 16)))


def test_partial_or_extra_keys_fail_loudly(tmp_path):
    path, _ = _encoder_file(tmp_path, "nnformer")
    task = _task((32, 32, 16))
    net, spec, sd, meta = _loaded_network(path, task)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    extra = dict(sd, **{"head.weight": torch.zeros(2)})
    with pytest.raises(EncoderMismatchError, match=r"unexpected \(file keys the network lacks\): 1"):
        transfer_encoder(net, spec, extra, meta, path)
    missing = {k: v for k, v in sd.items() if not k.startswith("stages.3")}
    with pytest.raises(EncoderMismatchError, match=r"(?s)missing.*stages\.3"):
        transfer_encoder(net, spec, missing, meta, path)
    wrong = dict(sd)
    key = next(k for k in sd if k.endswith("relative_position_bias_table"))
    wrong[key] = torch.zeros(3, 1)
    with pytest.raises(EncoderMismatchError, match="shape mismatch"):
        transfer_encoder(net, spec, wrong, meta, path)
    for k, v in net.encoder.state_dict().items():  # nothing was loaded by the failed attempts
        assert torch.equal(v, before[k]), k


def test_task_with_other_channel_count_is_refused(tmp_path):
    path = _save(tmp_path / "c2.pt", ViTEncoder(**dict(VIT_ARGS, in_channels=2)))
    with pytest.raises(EncoderMismatchError, match="2 input channel"):
        _loaded_network(path, _task((32, 32, 16)))


@pytest.mark.parametrize("arch", ["vit", "nnformer"])
def test_classifier_transfer(tmp_path, arch):
    path, _ = _encoder_file(tmp_path, arch)
    task = resolve_task("classification", roi=(32, 32, 16))
    net, spec, sd, meta = _loaded_network(path, task)
    assert spec["name"] == "classifier" and spec["args"]["encoder"] == arch
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        before = net(x)
    report = transfer_encoder(net, spec, sd, meta, path)
    assert report.ok and len(report.loaded) == len(sd)
    with torch.no_grad():
        after = net(x)
    assert after.shape == (2, 2) and not torch.allclose(before, after)


def test_random_init_baseline_takes_only_the_architecture(tmp_path):
    from alice3d.finetune.config import FinetuneConfig
    from alice3d.finetune.train import build_objective, load_pretrained

    path, _ = _encoder_file(tmp_path, "nnformer")
    sd, _ = load_encoder(path)
    task = _task((32, 32, 16))
    cfg = FinetuneConfig()
    cfg.model.pretrained = str(path)
    pre, report = build_objective(cfg, task, load_pretrained(cfg))
    cfg.model.init = "random"
    rnd, no_report = build_objective(cfg, task, load_pretrained(cfg))
    assert report is not None and no_report is None
    assert pre.spec == rnd.spec and rnd.metadata()["pretrained"] == ""
    key = "stages.0.blocks.0.attn.qkv.weight"
    assert torch.equal(pre.network.encoder.state_dict()[key], sd[key])
    assert not torch.equal(rnd.network.encoder.state_dict()[key], sd[key])
    # same seed: the decoder starts from the same weights in both arms
    assert torch.equal(pre.network.heads[0].weight, rnd.network.heads[0].weight)


def test_encoder_without_a_finetuning_network_is_refused(tmp_path):
    path = save_encoder(tmp_path / "r.pt", {"w": torch.zeros(1)}, {"arch": "resnet", "arch_args": {}})
    with pytest.raises(EncoderMismatchError, match="'resnet' encoder; fine-tuning networks exist for"):
        _loaded_network(path, _task((32, 32, 16)))
