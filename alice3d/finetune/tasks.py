"""Fine-tuning tasks: label maps, preprocessing geometry and evaluation settings.

A :class:`TaskSpec` is plain data (it is saved inside ``best.pt`` and read back by
``predict`` and the bundle export), built from a preset (``btcv``, ``flare22``,
``classification``) or from a Decathlon-style datalist plus label names (``custom``).

``TASK_PRESETS`` values follow REFERENCE.md section E and the MONAI BTCV tutorial:
RAS orientation, resampling to the task spacing, a clipped HU window scaled to [0, 1],
foreground crop, ROI-sized pos/neg crops for training and sliding windows for inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from alice3d.config import ConfigError

BTCV_LABELS = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder",
    5: "esophagus", 6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava",
    10: "portal_splenic_veins", 11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland",
}

# The label ids of the FLARE22 release.
FLARE22_LABELS = {
    0: "background", 1: "liver", 2: "right_kidney", 3: "spleen", 4: "pancreas", 5: "aorta",
    6: "inferior_vena_cava", 7: "right_adrenal_gland", 8: "left_adrenal_gland", 9: "gallbladder",
    10: "esophagus", 11: "stomach", 12: "duodenum", 13: "left_kidney",
}

CLASSIFICATION_LABELS = {0: "normal", 1: "findings"}

SEGMENTATION, CLASSIFICATION = "segmentation", "classification"


@dataclass(frozen=True)
class TaskSpec:
    """Everything that defines a task independently of the network.

    labels: class id -> name; for segmentation id 0 is the background.
    spacing: target voxel spacing in mm (segmentation); empty = keep the image's.
    roi: training crop and sliding-window size (segmentation) or resize target
        (classification), voxels per axis in RAS order.
    nsd_tolerance_mm: organ name -> surface tolerance in mm for NSD.
    """

    name: str
    kind: str
    labels: dict[int, str]
    spacing: tuple[float, ...]
    roi: tuple[int, ...]
    hu_window: tuple[float, float]
    orientation: str = "RAS"
    in_channels: int = 1
    modality: str = "CT"
    datalist_name: str = "dataset_0.json"
    nsd_tolerance_mm: dict[str, float] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def foreground(self) -> dict[int, str]:
        """Organ ids -> names (segmentation: everything but background)."""
        if self.kind == CLASSIFICATION:
            return dict(self.labels)
        return {k: v for k, v in self.labels.items() if k != 0}

    @property
    def spatial_dims(self) -> int:
        return len(self.roi)

    def tolerances(self) -> list[float]:
        """NSD tolerance (mm) per foreground class, in label-id order."""
        return [float(self.nsd_tolerance_mm[name]) for name in self.foreground.values()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        d["spacing"], d["roi"], d["hu_window"] = list(self.spacing), list(self.roi), list(self.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        d = dict(d)
        d["labels"] = {int(k): str(v) for k, v in d["labels"].items()}
        d["spacing"] = tuple(float(s) for s in d["spacing"])
        d["roi"] = tuple(int(s) for s in d["roi"])
        d["hu_window"] = tuple(float(s) for s in d["hu_window"])
        d["nsd_tolerance_mm"] = {str(k): float(v) for k, v in d.get("nsd_tolerance_mm", {}).items()}
        return cls(**d)


@dataclass(frozen=True)
class TaskPreset:
    """Defaults of a named task; ``phantom_*`` apply to the embedded synthetic cohort."""

    kind: str
    labels: dict[int, str] | None  # None: names come from the config (custom task)
    spacing: tuple[float, ...]
    roi: tuple[int, ...]
    hu_window: tuple[float, float]
    nsd_tolerance_mm: float = 1.0
    phantom_spacing: tuple[float, ...] = ()
    phantom_roi: tuple[int, ...] = ()
    phantom_ok: bool = False


TASK_PRESETS: dict[str, TaskPreset] = {
    # MONAI BTCV recipe; the phantom cohort runs at a coarser, CPU-sized geometry.
    "btcv": TaskPreset(SEGMENTATION, BTCV_LABELS, (1.5, 1.5, 2.0), (96, 96, 96), (-175.0, 250.0),
                       phantom_spacing=(3.0, 3.0, 4.0), phantom_roi=(64, 64, 32), phantom_ok=True),
    "flare22": TaskPreset(SEGMENTATION, FLARE22_LABELS, (1.5, 1.5, 2.0), (96, 96, 96), (-175.0, 250.0)),
    # MosMed-style COVID-19 CT findings (Alice supplement): HU -1000..400, resize 128x128x64.
    "classification": TaskPreset(CLASSIFICATION, CLASSIFICATION_LABELS, (), (128, 128, 64), (-1000.0, 400.0),
                                 phantom_roi=(64, 64, 32), phantom_ok=True),
    "custom": TaskPreset(SEGMENTATION, None, (1.5, 1.5, 2.0), (96, 96, 96), (-175.0, 250.0)),
}


def _custom_labels(names: list[str]) -> dict[int, str]:
    if not names:
        raise ConfigError(
            "task.name=custom needs task.labels: the organ names for label ids 1..K in order "
            "(e.g. task.labels=[liver,spleen]); id 0 is the background"
        )
    clean = [str(n).strip() for n in names]
    if "background" in clean:
        clean.remove("background")
    if len(set(clean)) != len(clean) or any(not n for n in clean):
        raise ConfigError(f"task.labels: names must be unique and non-empty, got {names!r}")
    return {0: "background", **{i + 1: n for i, n in enumerate(clean)}}


def resolve_task(
    name: str,
    *,
    labels: list[str] | None = None,
    spacing: tuple[float, ...] = (),
    roi: tuple[int, ...] = (),
    hu_window: tuple[float, ...] = (),
    nsd_tolerance_mm: float = 0.0,
    nsd_tolerance_per_organ: dict[str, float] | None = None,
    datalist_name: str = "",
    phantom: bool = False,
) -> TaskSpec:
    """Preset values, overridden by whatever is given non-empty; ``phantom`` picks the
    preset's CPU-sized geometry for the embedded cohort."""
    if name not in TASK_PRESETS:
        raise ConfigError(f"task.name: unknown task {name!r}; expected one of {sorted(TASK_PRESETS)}")
    p = TASK_PRESETS[name]
    if phantom and not p.phantom_ok:
        raise ConfigError(
            f"task {name!r} needs real data: pass --data-root DIR (a folder with {datalist_name or 'dataset_0.json'} "
            "or with imagesTr/ + labelsTr/) or data.data=DATALIST.json; the embedded phantom cohort carries BTCV "
            "labels (use --task btcv)"
        )
    if name == "custom":
        label_map = _custom_labels(list(labels or []))
    else:
        if labels:
            raise ConfigError(f"task.labels is only for task.name=custom; task {name!r} has fixed labels")
        label_map = dict(p.labels or {})
    default_spacing = p.phantom_spacing if phantom and p.phantom_spacing else p.spacing
    default_roi = p.phantom_roi if phantom and p.phantom_roi else p.roi
    spacing = tuple(float(s) for s in spacing) or default_spacing
    roi = tuple(int(r) for r in roi) or default_roi
    hu = tuple(float(h) for h in hu_window) or p.hu_window
    if len(hu) != 2 or hu[0] >= hu[1]:
        raise ConfigError(f"task.hu_window: expected [low, high] with low < high, got {list(hu)}")
    if any(r < 1 for r in roi):
        raise ConfigError(f"task.roi: expected positive sizes, got {list(roi)}")
    if p.kind == SEGMENTATION and len(spacing) != len(roi):
        raise ConfigError(f"task.spacing {list(spacing)} and task.roi {list(roi)} need the same number of axes")
    if any(s <= 0 for s in spacing):
        raise ConfigError(f"task.spacing: expected positive millimetres, got {list(spacing)}")
    tol = float(nsd_tolerance_mm) if nsd_tolerance_mm > 0 else p.nsd_tolerance_mm
    per_organ = dict(nsd_tolerance_per_organ or {})
    organs = [v for k, v in label_map.items() if k != 0 or p.kind == CLASSIFICATION]
    unknown = sorted(set(per_organ) - set(organs))
    if unknown:
        raise ConfigError(f"task.nsd_tolerance_per_organ: unknown organ(s) {unknown}; task {name!r} has {organs}")
    tolerances = {o: float(per_organ.get(o, tol)) for o in organs} if p.kind == SEGMENTATION else {}
    return TaskSpec(
        name=name, kind=p.kind, labels=label_map, spacing=spacing, roi=roi, hu_window=(hu[0], hu[1]),
        datalist_name=datalist_name or "dataset_0.json", nsd_tolerance_mm=tolerances,
    )
