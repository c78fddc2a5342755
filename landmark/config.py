"""Typed configuration of the landmark matcher (training, matching) and of Alice's crop pairs
(``PairsConfig``, the `pairs.` section of the pretraining config).

The dataclasses below are the single source of defaults; ``configs/landmark/*.yaml``
and ``key=value`` overrides only change existing fields (see :mod:`alice3d.config`).
The defaults describe a CPU-sized model that trains on the embedded phantom cohort in
a few minutes; ``configs/landmark/sam_full.yaml`` holds the paper-sized setting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from alice3d.config import ConfigError, DataConfig, TrainConfig, check_choice, from_dict, section


@dataclass
class ModelConfig:
    """ResNet-style 3D backbone + FPN with a fine and a coarse embedding head.

    Input channel 0 is the image in ``data.hu_window``; every entry of ``extra_windows``
    (HU ranges inside that window) adds a channel of the same image under that window,
    e.g. a soft-tissue window that makes organ boundaries visible.
    """

    extra_windows: tuple[tuple[float, float], ...] = ((-250.0, 350.0),)
    stem_width: int = 4  # full-resolution stem
    widths: tuple[int, ...] = (8, 16, 32, 64)  # stages at strides 2, 4, 8, 16
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # residual blocks per stage; ResNet-18 = (2, 2, 2, 2)
    fpn_dim: int = 16
    embed_dim: int = 128
    coarse_level: int = 4  # stage whose stride is the coarse stride (4 -> 2**4 = 16)
    norm: str = "batch"  # batch | none

    @property
    def in_channels(self) -> int:
        return 1 + len(self.extra_windows)

    @property
    def fine_stride(self) -> int:
        return 2

    @property
    def coarse_stride(self) -> int:
        return 2**self.coarse_level


@dataclass
class CropConfig:
    """Two augmented views of one volume per batch element (training only)."""

    size: tuple[int, int, int] = (64, 64, 48)  # voxels of each view
    scale_range: tuple[float, float] = (0.8, 1.2)  # independent per view
    shared_seed_prob: float = 0.8  # both views contain the same seed point
    shift_frac: float = 0.3  # view centre offset from the seed, fraction of the crop extent
    noise_std: float = 0.03  # max std of additive gaussian noise (normalized intensity)
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.0)  # voxels
    intensity_jitter: float = 0.05  # max relative scale and absolute shift
    gamma_range: tuple[float, float] = (0.7, 1.4)  # per-view gamma curve on the [0, 1] intensities
    body_threshold: float = 0.15  # normalized intensity above which a voxel is body


@dataclass
class LossConfig:
    """Pixel-level InfoNCE on the fine and the coarse embedding."""

    temperature: float = 0.5
    fine_pos_radius: float = 3.0  # mm; nearest voxel of the other view closer than this = positive
    fine_ignore_radius: float = 8.0  # mm; voxels closer than this are never negatives
    coarse_pos_radius: float = 25.0  # mm; used only to decide which anchors are valid
    coarse_ignore_radius: float = 25.0  # mm
    anchors: int = 256  # positive anchors per batch element
    mine_candidates: int = 4096  # voxels of the other view searched for hard negatives (random subset)
    hard_pool: int = 500  # hardest candidates kept per anchor (by fine + coarse similarity)
    negatives: int = 100  # negatives per anchor sampled from the hard pool
    random_negatives: int = 100  # plus negatives drawn uniformly outside the ignore radius
    coarse_negatives: int = 200  # random negatives per anchor for the coarse loss
    cross_volume_negatives: bool = True  # coarse negatives also from other volumes in the batch
    coarse_weight: float = 1.0


@dataclass
class MatchConfig:
    """How a query embedding is compared with every voxel of the target."""

    fine_weight: float = 0.5  # similarity = w * fine + (1 - w) * upsampled coarse
    refine: bool = True  # sub-voxel refinement of the peak (parabola per axis)
    coarse_cells: int = 128  # coarse-to-fine search (CPU default): coarse cells searched in detail
    chunk_voxels: int = 2**25  # queries x target voxels handled per block (memory bound)
    # "affine": map queries through a robust affine fitted, once per volume pair, to the
    # matches of body anchors that survive a round trip A -> B -> A; "none": per-point argmax.
    consistency: str = "affine"
    anchors: int = 256  # body points of A matched to fit the pair's affine
    roundtrip_mm: float = 10.0  # an anchor is kept if A -> B -> A lands this close to it
    # "affine" only: the best voxel within this many mm (per axis) of where the affine maps a
    # query, so local anatomy the affine cannot follow is matched by similarity; 0: the mapped point.
    local_radius_mm: float = 0.0

    def validate(self, prefix: str = "match.") -> None:
        """ConfigError naming ``prefix + key`` for a value the search or the fit cannot use."""
        check_choice(f"{prefix}consistency", self.consistency, list(CONSISTENCY_MODES))
        if not 0.0 <= self.fine_weight <= 1.0:
            raise ConfigError(f"{prefix}fine_weight: expected a weight in [0, 1], got {self.fine_weight}")
        for key, low in (("coarse_cells", 1), ("chunk_voxels", 1), ("anchors", 0), ("roundtrip_mm", 0.0),
                         ("local_radius_mm", 0.0)):
            if not getattr(self, key) >= low:
                raise ConfigError(f"{prefix}{key}: expected at least {low}, got {getattr(self, key)}")


CONSISTENCY_MODES = ("affine", "none")


def resolve_match_config(stored: dict | None = None, **explicit) -> MatchConfig:
    """One :class:`MatchConfig` from explicit arguments, a model file's ``match`` metadata and defaults.

    Per field: the explicit argument unless it is None (so an explicit 0 or 0.0 counts), else the
    stored value, else the default (files written before a field existed hold no such key).
    Stored keys that are not fields (files of other versions) are ignored.
    """
    names = {f.name for f in fields(MatchConfig)}
    unknown = sorted(set(explicit) - names)
    if unknown:
        raise TypeError(f"unknown match settings {unknown}; expected some of {sorted(names)}")
    values = {k: v for k, v in (stored or {}).items() if k in names}
    values.update({k: v for k, v in explicit.items() if v is not None})
    cfg = from_dict(MatchConfig, values)
    cfg.validate(prefix="")
    return cfg


@dataclass
class PairsConfig:
    """Where Alice's (Q, K) crop pairs come from (the `pairs.` section of the pretraining config).

    ``landmark``: the landmark matcher finds the point in K that matches a random body point in
    Q (the method as published). ``same_position``: a baseline without a matcher that takes the
    same normalised position in the two volumes' bounding boxes. ``same_volume``: Q and K are the
    same crop of one volume (only their views differ), i.e. no inter-volume alignment (the
    paper's Table 5 ablation, with ``alice.w_inter=0``). ``random``: K is a crop at a random body
    point of a random other volume, i.e. Alice's pipeline without the registration (a control).
    """

    source: str = "landmark"
    min_score: float = 0.3
    max_retries: int = 8
    # Matcher consistency for pairs. "affine" is far more accurate than the per-point argmax
    # "none" (README, landmark table) but fits one affine per new volume pair (about 1 s on CPU,
    # n^2 pairs); "reference" fits each volume once to a reference volume and composes the maps
    # (O(n), nearly as accurate, no embeddings needed while training); "auto": reference when
    # the volumes come from a volume store, none when they are held in memory.
    consistency: str = "auto"
    embedding_cache_mb: float = 2048.0  # per process: embeddings held for "none"/"affine" on a store

    def validate(self, prefix: str = "pairs") -> None:
        check_choice(f"{prefix}.source", self.source, ["landmark", "same_position", "same_volume", "random"])
        check_choice(f"{prefix}.consistency", self.consistency, ["auto", "none", "affine", "reference"])


def _landmark_data() -> DataConfig:
    return DataConfig(spacing=(2.0, 2.0, 2.0), hu_window=(-1024.0, 3071.0))


def _landmark_train() -> TrainConfig:
    return TrainConfig(
        max_steps=300,
        batch_size=2,
        lr=2e-3,
        min_lr=1e-5,
        weight_decay=1e-4,
        warmup_steps=20,
        grad_clip=3.0,
        ckpt_every=100,
    )


@dataclass
class LandmarkConfig:
    train: TrainConfig = section(_landmark_train)
    data: DataConfig = section(_landmark_data)
    model: ModelConfig = section(ModelConfig)
    crop: CropConfig = section(CropConfig)
    loss: LossConfig = section(LossConfig)
    match: MatchConfig = section(MatchConfig)

    def validate(self) -> None:
        m = self.model
        if len(m.widths) != len(m.blocks):
            raise ConfigError(
                f"model.widths ({list(m.widths)}) and model.blocks ({list(m.blocks)}) "
                "must have the same length (one entry per stage)"
            )
        if not 1 <= m.coarse_level <= len(m.widths):
            raise ConfigError(f"model.coarse_level: expected 1..{len(m.widths)}, got {m.coarse_level}")
        check_choice("model.norm", m.norm, ["batch", "none"])
        self.match.validate()
        if len(self.data.spacing) != 3:
            raise ConfigError(f"data.spacing: expected 3 values (mm), got {list(self.data.spacing)}")
        lo, hi = self.data.hu_window
        if not hi > lo:
            raise ConfigError(f"data.hu_window: expected [low, high] with high > low, got {[lo, hi]}")
        for w in m.extra_windows:
            if not (lo <= w[0] < w[1] <= hi):
                raise ConfigError(
                    f"model.extra_windows: {list(w)} must be an increasing HU range inside data.hu_window {[lo, hi]}"
                )
        step = 2 ** len(m.widths)
        if any(s % step for s in self.crop.size):
            raise ConfigError(
                f"crop.size: every side must be a multiple of the total stride {step} (2 ** number of "
                f"model.widths), got {list(self.crop.size)}"
            )
        if self.loss.fine_ignore_radius < self.loss.fine_pos_radius:
            raise ConfigError("loss.fine_ignore_radius must be >= loss.fine_pos_radius")
        if self.loss.temperature <= 0:
            raise ConfigError(f"loss.temperature: expected > 0, got {self.loss.temperature}")
