"""Linear CKA, the per-block occlusion-invariance analysis, its CSV and its PNG plot."""

import numpy as np
import pytest
import torch

from alice3d.analysis.cka import linear_cka, occlusion_invariance, plot_cka, read_cka_csv, write_cka_csv
from alice3d.encoders.resnet import build_resnet
from alice3d.encoders.vit import ViTEncoder
from alice3d.viz.png import read_png


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cka_of_a_feature_with_itself_is_one_and_of_independent_features_near_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = torch.randn(2000, 8, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= linear_cka(x, y) < 0.02
    small_x, small_y = x[:200], torch.randn(200, 64, generator=g)
    # With few rows and wide features plain linear CKA is biased upwards; the debiased one is not.
    assert linear_cka(small_x, small_y) > 0.1
    assert abs(linear_cka(small_x, small_y, debiased=True)) < 0.05


def test_cka_invariances_and_a_hand_computed_value():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, 5.0 * x @ q + 3.0) == pytest.approx(1.0, abs=1e-9)
    # One-dimensional features: CKA is the squared Pearson correlation.
    a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    b = torch.tensor([[1.0], [3.0], [2.0], [4.0]])
    r = np.corrcoef(a[:, 0].numpy(), b[:, 0].numpy())[0, 1]
    assert linear_cka(a, b) == pytest.approx(r**2)
    with pytest.raises(ValueError, match="equal N"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))


@pytest.mark.parametrize("mode", ["drop", "zero"])
def test_vit_occlusion_invariance_per_block(mode):
    torch.manual_seed(0)
    enc = ViTEncoder((16, 16), 4, spatial_dims=2, hidden_size=32, mlp_dim=64, num_layers=3, num_heads=4)
    images = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    res = occlusion_invariance(enc, images, ratios=(0.0, 0.5, 0.9), mode=mode, batch_size=10)
    assert set(res) == {0.0, 0.5, 0.9} and all(len(v) == 3 for v in res.values())
    assert res[0.0] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)  # nothing masked: identical features
    assert all(v < 0.999 for v in res[0.9])
    again = occlusion_invariance(enc, images, ratios=(0.0, 0.5, 0.9), mode=mode, batch_size=7)
    assert again[0.5] == pytest.approx(res[0.5], abs=1e-9)  # the masks come from the seed, not the batching
    tokens = occlusion_invariance(enc, images, ratios=(0.5,), mode=mode, pool="tokens")
    assert len(tokens[0.5]) == 3 and all(-1e-6 <= v <= 1 + 1e-6 for v in tokens[0.5])
    assert enc.training  # the mode is restored


def test_resnet_occlusion_invariance_in_3d():
    torch.manual_seed(0)
    enc = build_resnet("resnet18_tiny", spatial_dims=3, layers=[1, 1, 1, 1], widths=[8, 8, 8, 8])
    images = torch.rand(6, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    res = occlusion_invariance(enc, images, ratios=(0.0, 0.75), mask_patch=8, pool="tokens")
    assert len(res[0.75]) == 4 and res[0.0] == pytest.approx([1.0] * 4, abs=1e-6)
    with pytest.raises(ValueError, match="ViT"):
        occlusion_invariance(enc, images, mode="drop")


def test_csv_round_trip_and_plot(tmp_path):
    res = {0.25: [0.9, 0.8, 0.7], 0.75: [0.6, 0.5, 0.4]}
    path = write_cka_csv(res, tmp_path / "cka.csv", label="mae")
    assert path.read_text().splitlines()[0] == "label,mask_ratio,block,cka"
    assert read_cka_csv(path) == res
    png = plot_cka(res, tmp_path / "cka.png")
    img = read_png(png)
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[:2] == (420, 640)
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # one colour per series
