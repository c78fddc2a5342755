"""`PretrainConfig`: the config of `alice3d-pretrain`. Its defaults are the embedded CPU-sized run;
configs/pretrain/*.yaml carry the paper settings.

One section per registered method (`alice3d.methods.METHODS`), named like the method, holds
that method's config with CPU-sized defaults (ViT-tiny, 64x64x32 crops, small decoders).
"""

from __future__ import annotations

from dataclasses import dataclass

from alice3d.config import DataConfig, TrainConfig, check_choice, section
from alice3d.data.slices import SliceConfig
from alice3d.methods import METHODS
from alice3d.methods.alice import AliceConfig
from alice3d.methods.cae import CAEConfig
from alice3d.methods.ccmim import CCMIMConfig
from alice3d.methods.convmim import ConvMIMConfig
from alice3d.methods.mae import MAEConfig
from alice3d.methods.rmae import CMAEConfig, RMAEConfig
from landmark.pairs import PairsConfig

__all__ = ["PretrainConfig", "PairsConfig"]

# The tiny CPU backbone every ViT-based method shares in the embedded default.
_CPU_VIT = dict(encoder="vit_tiny", img_size=(64, 64, 32))
_CPU_DECODER = dict(decoder_dim=96, decoder_depth=2, decoder_heads=4)
_CPU_PROJ = dict(proj_hidden_dim=256, proj_dim=64)


def _cpu_data() -> DataConfig:
    return DataConfig(spacing=(3.0, 3.0, 3.0))


def _cpu_train() -> TrainConfig:
    return TrainConfig(max_steps=150, batch_size=4, lr=5e-4, warmup_steps=15, ckpt_every=50, preview_every=0)


def _cpu_alice() -> AliceConfig:
    # Without BatchNorm in the head, a predictor and an EMA scaled to the run length, the
    # paper's negative cosine collapses here within ~10 steps (target_std ~0.08); with them
    # target_std stays ~0.8 (scripts/experiments/collapse_sweep.py, README "Pretraining").
    return AliceConfig(**_CPU_VIT, **_CPU_DECODER, head_out_dim=128, head_hidden_dim=256, head_bottleneck_dim=64,
                       head_bn=True, predictor_hidden_dim=256, predictor_norm="bn", ema_reference_steps=1500)


@dataclass
class PretrainConfig:
    method: str = "alice"
    landmark: str = ""  # RUN/landmark.pt; "" with the embedded cohort = the default phantom matcher
    train: TrainConfig = section(_cpu_train)
    data: DataConfig = section(_cpu_data)
    pairs: PairsConfig = section(PairsConfig)  # Alice
    slices: SliceConfig = section(SliceConfig)  # 2D methods: which slices of the volumes
    alice: AliceConfig = section(_cpu_alice)
    mae: MAEConfig = section(lambda: MAEConfig(**_CPU_VIT, **_CPU_DECODER))
    cae: CAEConfig = section(lambda: CAEConfig(**_CPU_VIT, **_CPU_DECODER))
    ccmim: CCMIMConfig = section(lambda: CCMIMConfig(**_CPU_VIT, **_CPU_DECODER, **_CPU_PROJ))
    rmae: RMAEConfig = section(lambda: RMAEConfig(**_CPU_VIT, **_CPU_DECODER))
    cmae: CMAEConfig = section(lambda: CMAEConfig(**_CPU_VIT, **_CPU_PROJ))
    convmim: ConvMIMConfig = section(lambda: ConvMIMConfig(encoder="resnet18_tiny", img_size=(64, 64, 32)))

    def method_config(self):
        """The section of the chosen method."""
        return getattr(self, self.method)

    def validate(self) -> None:
        check_choice("method", self.method, sorted(METHODS))
        check_choice("data.on_bad_data", self.data.on_bad_data, ["skip", "fail"])
        self.pairs.validate("pairs")
        self.method_config().validate(self.method)
