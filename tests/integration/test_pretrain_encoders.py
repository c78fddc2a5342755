"""`alice3d-pretrain` with a non-default encoder: a paper config with `mae.encoder=swin_tiny` trains
and its encoder.pt loads strict into MONAI's SwinUNETR.swinViT."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from alice3d.cli.pretrain import main
from alice3d.encoders.files import load_encoder

# Sizes that keep the run to seconds on one CPU thread; the paper config supplies the rest.
FAST = ["mae.img_size=[64,64,32]", "mae.encoder_kwargs={window_size: 4}", "mae.decoder_dim=24",
        "mae.decoder_depth=1", "mae.decoder_heads=2", "data.spacing=[4,4,4]", "train.max_steps=2",
        "train.batch_size=1", "train.device=cpu", "train.warmup_steps=1", "train.log_every=1",
        "train.preview_every=0", "train.ckpt_every=0"]


@pytest.fixture
def cohort(tmp_path):
    from alice3d.data.phantom import generate_cohort

    return generate_cohort(tmp_path / "cohort", n=2, seed=0, size="tiny", shape=(64, 64, 40), spacing=(4.0, 4.0, 4.0),
                           workers=1, progress=False)


def test_mae_3d_config_with_a_swin_encoder_exports_into_swinunetr(cohort, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/pretrain/mae_3d.yaml", "mae.encoder=swin_tiny", "--out", str(run),
              "--data", str(cohort / "dataset_0.json"), *FAST])
    assert e.value.code == 0
    state, meta = load_encoder(run / "encoder.pt")
    assert meta["arch"] == "swin" and meta["method"] == "mae" and meta["crop_size"] == [64, 64, 32]
    args = meta["arch_args"]
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=args["feature_size"], depths=tuple(args["depths"]),
                    num_heads=tuple(args["num_heads"]), window_size=tuple(args["window_size"]),
                    spatial_dims=args["spatial_dims"])
    net.swinViT.load_state_dict(state, strict=True)
