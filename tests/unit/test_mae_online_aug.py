"""mae.online_aug: MAE can see the same (resized-crop + flip) views as Alice's online branch."""

import pytest
import torch

from alice3d.config import ConfigError
from alice3d.methods.mae import MAE, TINY, MAEConfig
from alice3d.methods.views import OnlineAugConfig


@pytest.mark.parametrize("spatial_dims,img_size", [(2, (32, 32)), (3, (32, 32, 16))])
def test_online_aug_changes_what_mae_reconstructs_only_when_enabled_and_training(spatial_dims, img_size):
    # A flip-only augmentation (full-size box) of a ramp: the reconstruction target changes
    # deterministically when a flip happens, so the loss differs from the unaugmented one.
    flip_only = OnlineAugConfig(enabled=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    cfg = dict(TINY, img_size=img_size, spatial_dims=spatial_dims)
    ramp = torch.linspace(0, 1, img_size[0]).reshape(1, 1, -1, *([1] * (spatial_dims - 1))).expand(2, 1, *img_size)
    batch = {"image": ramp.contiguous()}

    def loss(model):
        torch.manual_seed(3)  # the same mask in every call
        return model(batch)["loss"].item()

    torch.manual_seed(0)
    plain = MAE(MAEConfig(**cfg))
    torch.manual_seed(0)
    augmented = MAE(MAEConfig(**cfg, online_aug=flip_only))
    assert loss(plain) != pytest.approx(loss(augmented), rel=1e-6)
    augmented.eval()  # evaluation sees the crop as it is
    plain.eval()
    assert loss(plain) == pytest.approx(loss(augmented), rel=1e-6)
    # Off by default: MAE's defaults are unchanged.
    assert MAEConfig().online_aug.enabled is False


def test_online_aug_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="mae.online_aug.scale"):
        MAEConfig(**TINY, online_aug=OnlineAugConfig(enabled=True, scale=(0.0, 1.0))).validate()
