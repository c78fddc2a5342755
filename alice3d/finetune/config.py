"""``FinetuneConfig``: the typed config of ``alice3d-finetune``.

Defaults are CPU-sized (tiny networks on the embedded phantom cohort); the paper's
recipes live in ``configs/finetune/btcv_{unetr,swin_unetr,nnformer}.yaml``. Task
geometry left empty (``task.spacing``, ``task.roi``, ``task.hu_window``) means "the
task preset's value for this device"; resolving the task fills it in (and, for a custom
task, the label names and lateral pairs) so the run's ``config.yaml`` records what was
actually used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alice3d.config import ConfigError, TrainConfig, check_choice, section

MODELS = ("unetr", "swin_unetr", "nnformer")
CLASSIFIER_ENCODERS = ("vit", "swin", "nnformer")


@dataclass
class FinetuneDataConfig:
    """Where cases come from and how they are split (spacing/HU live in ``task``)."""

    data: str = ""  # datalist JSON or a folder holding task.datalist; "" = embedded phantom cohort
    on_bad_data: str = "skip"  # skip: report and leave the case out of training | fail: stop
    cache: str = "memory"  # memory: preprocess every case once | none: preprocess on every use
    phantom_n: int = 12  # subjects in the embedded cohort
    phantom_seed: int = 0
    kfold: int = 0  # > 1: pool training+validation and cross-validate; 0 = datalist split
    fold: int = -1  # with kfold: the one fold to run; -1 = all folds one after the other
    split_seed: int = 0  # seeds the k-fold shuffle and the label-fraction subset
    label_fraction: float = 1.0  # fine-tune on this fraction of the training cases
    n_labeled: int = 0  # > 0: fine-tune on exactly this many training cases (overrides the fraction)


@dataclass
class TaskConfig:
    name: str = "btcv"  # btcv | flare22 | classification | custom
    labels: list[str] = field(default_factory=list)  # custom: organ names of ids 1..K; [] = the datalist's "labels"
    # () = task preset: the GPU geometry on CUDA, the CPU-sized one on the CPU and for the phantoms
    spacing: tuple[float, ...] = ()  # mm
    roi: tuple[int, ...] = ()  # voxels
    # [[right_id, left_id], ...] exchanged by training flips; null = the preset's (btcv, flare22)
    # or, for custom, pairs of label names differing by right/left (R/L); [] = none
    lateral_pairs: list[list[int]] | None = None
    hu_window: tuple[float, ...] = ()  # (); = task preset
    nsd_tolerance_mm: float = 0.0  # 0 = task preset (1 mm)
    nsd_tolerance_per_organ: dict[str, float] = field(default_factory=dict)
    datalist: str = ""  # file name inside --data-root; "" = dataset_0.json


@dataclass
class ModelConfig:
    """Network choice and sizes. With ``pretrained`` the encoder file's metadata fixes the
    encoder part; the fields here then only size the decoder/head."""

    name: str = ""  # unetr | swin_unetr | nnformer (segmentation), vit | swin | nnformer (classification); "" = from the encoder file, else unetr / vit
    pretrained: str = ""  # path to an encoder.pt
    init: str = "pretrained"  # pretrained: load the encoder's weights | random: only take its architecture (baseline)
    feature_size: int = 12  # UNETR / SwinUNETR decoder width (SwinUNETR: multiple of 12)
    # UNETR's ViT (patch 16 and 12 layers are fixed by MONAI's UNETR)
    hidden_size: int = 96
    mlp_dim: int = 384
    num_heads: int = 4
    qkv_bias: bool = False
    # SwinUNETR
    swin_depths: tuple[int, ...] = (2, 2, 2, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    # nnFormer
    nnformer_preset: str = "nnformer_tiny"
    deep_supervision: bool = True
    ds_weights: tuple[float, ...] = ()  # () = 1, 1/2, 1/4, ... normalised (nnU-Net style)
    norm_name: str = "instance"
    dropout_path_rate: float = 0.0
    use_checkpoint: bool = False
    channels_last: bool = True  # channels-last-3d activations in training/validation (CPU conv backward ~2-7x faster)


@dataclass
class OptimConfig:
    """What fine-tuning adds to ``train.optimizer`` / ``train.momentum`` (nnFormer recipe:
    sgd, momentum 0.99, Nesterov, poly)."""

    nesterov: bool = True  # sgd only
    schedule: str = "cosine"  # cosine (warmup + cosine) | poly (warmup + (1 - t)**power)
    poly_power: float = 0.9
    # Learning rate of the pretrained encoder relative to train.lr. Adam moves every weight by
    # ~lr per step whatever its gradient, so at a from-scratch lr a few hundred steps overwrite
    # a pretrained encoder (scripts/experiments/fewlabel_transfer.py measures it).
    encoder_lr_scale: float = 1.0
    layer_decay: float = 1.0  # ViT encoders: block i of L gets encoder_lr_scale * layer_decay**(L - i) (MAE/BEiT)


@dataclass
class AugConfig:
    """Random augmentation of training crops (MONAI BTCV recipe by default)."""

    # Crop centres. posneg: MONAI RandCropByPosNegLabeld, a foreground voxel with weight pos, a
    # background one with weight neg (the large organs dominate the foreground). classes:
    # RandCropByLabelClassesd, first a class (background weight neg, each organ weight pos),
    # then a voxel of it, so small organs are seen as often as the liver.
    crop: str = "posneg"
    pos: float = 1.0
    neg: float = 1.0
    flip_prob: float = 0.1  # per axis
    rot90_prob: float = 0.1  # in-plane, only when the ROI is square in-plane
    shift_intensity: float = 0.1  # offset range of RandShiftIntensityd
    shift_prob: float = 0.5
    scale_prob: float = 0.0  # random zoom (nnFormer recipe: scaling)
    scale_range: float = 0.15
    blur_prob: float = 0.0  # gaussian blur (nnFormer recipe)


@dataclass
class EvalConfig:
    sw_batch_size: int = 4
    sw_overlap: float = 0.5
    sw_mode: str = "gaussian"  # constant | gaussian
    n_previews: int = 2  # validation cases rendered into RUN/previews/
    max_val_cases: int = 0  # > 0: validate during training on the first N validation cases only


@dataclass
class FinetuneConfig:
    # CPU-sized: a tiny network learns the large phantom organs within ~100 steps at lr 1e-3.
    train: TrainConfig = section(lambda: TrainConfig(max_steps=100, batch_size=2, lr=1e-3, weight_decay=1e-5,
                                                     betas=(0.9, 0.999), warmup_steps=10, grad_clip=1.0,
                                                     ckpt_every=50, eval_every=50))
    data: FinetuneDataConfig = section(FinetuneDataConfig)
    task: TaskConfig = section(TaskConfig)
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    aug: AugConfig = section(AugConfig)
    eval: EvalConfig = section(EvalConfig)

    def validate(self) -> None:
        check_choice("data.on_bad_data", self.data.on_bad_data, ("skip", "fail"))
        check_choice("data.cache", self.data.cache, ("memory", "none"))
        check_choice("train.optimizer", self.train.optimizer, ("adamw", "sgd"))
        check_choice("optim.schedule", self.optim.schedule, ("cosine", "poly"))
        check_choice("eval.sw_mode", self.eval.sw_mode, ("constant", "gaussian"))
        check_choice("model.init", self.model.init, ("pretrained", "random"))
        check_choice("aug.crop", self.aug.crop, ("posneg", "classes"))
        if self.model.name:
            check_choice("model.name", self.model.name, MODELS + CLASSIFIER_ENCODERS)
        if not 0.0 <= self.optim.encoder_lr_scale:
            raise ConfigError(f"optim.encoder_lr_scale: expected a value >= 0, got {self.optim.encoder_lr_scale}")
        if not 0.0 < self.optim.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay: expected a value in (0, 1], got {self.optim.layer_decay}")
        if not 0.0 < self.data.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction: expected a value in (0, 1], got {self.data.label_fraction}")
        if self.data.kfold == 1 or self.data.kfold < 0:
            raise ConfigError(f"data.kfold: expected 0 (datalist split) or >= 2 folds, got {self.data.kfold}")
        if self.data.kfold and not -1 <= self.data.fold < self.data.kfold:
            raise ConfigError(f"data.fold: expected -1 (all) or 0..{self.data.kfold - 1}, got {self.data.fold}")
        if not 0.0 <= self.eval.sw_overlap < 1.0:
            raise ConfigError(f"eval.sw_overlap: expected a value in [0, 1), got {self.eval.sw_overlap}")
        if self.model.feature_size % 12 and self.model.name == "swin_unetr":
            raise ConfigError(f"model.feature_size: SwinUNETR needs a multiple of 12, got {self.model.feature_size}")
