"""Landmark network: output shapes and strides, grid convention, padding, 2D/3D."""

import numpy as np
import pytest
import torch

from landmark.config import ModelConfig
from landmark.model import build_model, embed_volume, grid_affine, pad_to_multiple, recalibrate_norms

TINY = ModelConfig(stem_width=4, widths=(8, 8, 8, 8), fpn_dim=8, embed_dim=16, extra_windows=())


@pytest.mark.parametrize("spatial_dims,size", [(3, (32, 32, 16)), (2, (48, 32))])
def test_shapes_strides_and_unit_norm(spatial_dims, size):
    torch.manual_seed(0)
    net = build_model(TINY, spatial_dims).eval()
    fine, coarse = net(torch.randn(2, 1, *size))
    assert fine.shape == (2, 16, *[s // 2 for s in size])
    assert coarse.shape == (2, 16, *[s // 16 for s in size])
    torch.testing.assert_close(fine.norm(dim=1), torch.ones_like(fine[:, 0]))
    torch.testing.assert_close(coarse.norm(dim=1), torch.ones_like(coarse[:, 0]))


def test_coarse_level_sets_the_coarse_stride():
    cfg = ModelConfig(stem_width=4, widths=(8, 8, 8, 8), fpn_dim=8, embed_dim=16, coarse_level=3, extra_windows=())
    net = build_model(cfg).eval()
    fine, coarse = net(torch.randn(1, 1, 32, 32, 32))
    assert cfg.coarse_stride == 8 and coarse.shape[2:] == (4, 4, 4) and fine.shape[2:] == (16, 16, 16)


def test_forward_rejects_sizes_not_multiple_of_total_stride():
    net = build_model(TINY)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.randn(1, 1, 30, 32, 32))


def test_embed_volume_pads_odd_sizes_and_keeps_index_origin():
    torch.manual_seed(0)
    net = build_model(TINY).eval()
    x = torch.rand(1, 37, 21, 18)
    fine, coarse = embed_volume(net, x)
    assert fine.shape == (16, 19, 11, 9) and coarse.shape == (16, 3, 2, 2)
    # Padding sits at the far end: the output equals the network on the explicitly padded input.
    ref_f, _ = net(pad_to_multiple(x[None], 16))
    torch.testing.assert_close(fine, ref_f[0, :, :19, :11, :9])


def test_grid_affine_centres_blocks():
    aff = np.array([[-2.0, 0, 0, 10], [0, 2, 0, -5], [0, 0, 3, 1], [0, 0, 0, 1]])
    g = grid_affine(aff, 2).numpy()
    # fine voxel 0 is the centre of input voxels 0 and 1 (index 0.5); voxel spacing doubles
    np.testing.assert_allclose(g @ [0, 0, 0, 1], aff @ [0.5, 0.5, 0.5, 1])
    np.testing.assert_allclose(g @ [1, 2, 3, 1], aff @ [2.5, 4.5, 6.5, 1])


def test_recalibrate_norms_gives_diverse_features_and_restores_mode():
    torch.manual_seed(0)
    net = build_model(TINY).eval()
    x = torch.rand(1, 1, 32, 32, 32)

    def spread() -> float:  # 1 - mean cosine similarity between voxels
        with torch.no_grad():
            f = net(x)[0][0].flatten(1).T
        return 1 - float((f @ f.T).mean())

    before = spread()
    recalibrate_norms(net, [x])
    assert not net.training
    assert spread() > 10 * before  # init statistics collapse features; data statistics spread them
    bn = net.stem[1]
    assert bn.momentum == 0.1 and bn.num_batches_tracked == 1


def test_landmark_config_defaults_and_validation(tmp_path):
    from alice3d.config import ConfigError, load_config
    from landmark.config import LandmarkConfig

    cfg = load_config(LandmarkConfig)
    assert cfg.data.spacing == (2.0, 2.0, 2.0) and cfg.data.hu_window == (-1024.0, 3071.0)
    assert cfg.model.embed_dim == 128 and cfg.model.fine_stride == 2 and cfg.model.coarse_stride == 16
    assert cfg.model.in_channels == 1 + len(cfg.model.extra_windows)
    cfg = load_config(LandmarkConfig, None, ["model.extra_windows=[]", "train.max_steps=5"])
    assert cfg.model.in_channels == 1 and cfg.train.max_steps == 5
    bad = {
        "crop.size=[64,64,40]": "multiple of the total stride 16",
        "model.extra_windows=[[-2000,0]]": "inside data.hu_window",
        "model.blocks=[1,1]": "same length",
        "model.norm=group": "model.norm",
        "loss.fine_ignore_radius=1": "fine_ignore_radius",
        "loss.nonsense=1": "unknown config key",
    }
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load_config(LandmarkConfig, None, [override])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  widths: [8, 8, 8, 8, 8]\n  blocks: [1, 1, 1, 1, 1]\ncrop:\n  size: [64, 64, 48]\n")
    with pytest.raises(ConfigError, match="total stride 32"):
        load_config(LandmarkConfig, path)
