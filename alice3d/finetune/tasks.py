"""Fine-tuning tasks: label maps, preprocessing geometry and evaluation settings.

A :class:`TaskSpec` is plain data (it is saved inside ``best.pt`` and read back by
``predict`` and the bundle export), built from a preset (``btcv``, ``flare22``,
``classification``) or from a Decathlon-style datalist plus label names (``custom``).

``TASK_PRESETS`` values follow REFERENCE.md section E and the MONAI BTCV tutorial:
RAS orientation, resampling to the task spacing, a clipped HU window scaled to [0, 1],
foreground crop, ROI-sized pos/neg crops for training and sliding windows for inference.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from alice3d.config import ConfigError

log = logging.getLogger("alice3d.finetune")

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
    lateral_pairs: ``(right_id, left_id)`` pairs of mirror-image structures (kidneys,
        adrenals, parotids, lungs): a training flip exchanges their ids (see
        :class:`alice3d.finetune.transforms.RandLateralFlipd`).
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
    lateral_pairs: tuple[tuple[int, int], ...] = ()

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
        d["lateral_pairs"] = [list(pair) for pair in self.lateral_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        d = dict(d)
        d["labels"] = {int(k): str(v) for k, v in d["labels"].items()}
        d["spacing"] = tuple(float(s) for s in d["spacing"])
        d["roi"] = tuple(int(s) for s in d["roi"])
        d["hu_window"] = tuple(float(s) for s in d["hu_window"])
        d["nsd_tolerance_mm"] = {str(k): float(v) for k, v in d.get("nsd_tolerance_mm", {}).items()}
        # Absent from the best.pt of runs made before lateral pairs existed.
        d["lateral_pairs"] = tuple((int(a), int(b)) for a, b in d.get("lateral_pairs", ()))
        return cls(**d)


@dataclass(frozen=True)
class TaskPreset:
    """Defaults of a named task.

    ``spacing``/``roi`` are the GPU geometry (MONAI's BTCV recipe); ``cpu_spacing``/``cpu_roi``
    the CPU-sized one, used for the embedded phantom cohort and for training on the CPU when
    ``task.spacing``/``task.roi`` are not set (empty: the GPU value).
    """

    kind: str
    labels: dict[int, str] | None  # None: names come from the config or the datalist (custom task)
    spacing: tuple[float, ...]
    roi: tuple[int, ...]
    hu_window: tuple[float, float]
    nsd_tolerance_mm: float = 1.0
    cpu_spacing: tuple[float, ...] = ()
    cpu_roi: tuple[int, ...] = ()
    phantom_ok: bool = False
    lateral_pairs: tuple[tuple[int, int], ...] = ()  # (right id, left id)


# 3 x 3 x 4 mm and a 64 x 64 x 32 ROI (19 x 19 x 13 cm) keep a CPU step at about a second with
# the default tiny networks (configs/finetune/*_cpu.yaml use the same).
_CPU_SPACING, _CPU_ROI = (3.0, 3.0, 4.0), (64, 64, 32)

TASK_PRESETS: dict[str, TaskPreset] = {
    # MONAI BTCV recipe; the phantom cohort and CPU training run at a coarser, CPU-sized geometry.
    "btcv": TaskPreset(SEGMENTATION, BTCV_LABELS, (1.5, 1.5, 2.0), (96, 96, 96), (-175.0, 250.0),
                       cpu_spacing=_CPU_SPACING, cpu_roi=_CPU_ROI, phantom_ok=True,
                       lateral_pairs=((2, 3), (12, 13))),
    "flare22": TaskPreset(SEGMENTATION, FLARE22_LABELS, (1.5, 1.5, 2.0), (96, 96, 96), (-175.0, 250.0),
                          cpu_spacing=_CPU_SPACING, cpu_roi=_CPU_ROI, lateral_pairs=((2, 13), (7, 8))),
    # MosMed-style COVID-19 CT findings (Alice supplement): HU -1000..400, resize 128x128x64.
    "classification": TaskPreset(CLASSIFICATION, CLASSIFICATION_LABELS, (), (128, 128, 64), (-1000.0, 400.0),
                                 cpu_roi=(64, 64, 32), phantom_ok=True),
    "custom": TaskPreset(SEGMENTATION, None, (1.5, 1.5, 2.0), (96, 96, 96), (-175.0, 250.0),
                         cpu_spacing=_CPU_SPACING, cpu_roi=_CPU_ROI),
}


def _custom_labels(names: list[str]) -> dict[int, str]:
    if not names:
        raise ConfigError(
            "task.name=custom needs task.labels, the organ names of label ids 1..K in order (e.g. "
            "task.labels=[liver,spleen]), or a Decathlon 'labels' field in the datalist "
            '({"0": "background", "1": "liver", "2": "spleen"}); id 0 is the background'
        )
    clean = [str(n).strip() for n in names]
    if "background" in clean:
        clean.remove("background")
    if len(set(clean)) != len(clean) or any(not n for n in clean):
        raise ConfigError(f"task.labels: names must be unique and non-empty, got {names!r}")
    return {0: "background", **{i + 1: n for i, n in enumerate(clean)}}


_RIGHT, _LEFT = {"right", "r"}, {"left", "l"}


def _side_and_stem(name: str) -> tuple[str, str] | None:
    """``"Parotid_R"`` / ``"right parotid"`` / ``"RightParotid"`` -> ``("R", "parotid")``; None
    for a name with no side word, or with more than one."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower())
    sides = [i for i, w in enumerate(words) if w in _RIGHT | _LEFT]
    if len(sides) != 1:
        return None
    side = "R" if words[sides[0]] in _RIGHT else "L"
    stem = " ".join(w for i, w in enumerate(words) if i != sides[0])
    return (side, stem) if stem else None


def lateral_pairs_from_names(labels: dict[int, str]) -> tuple[tuple[int, int], ...]:
    """``(right_id, left_id)`` of every two labels whose names differ only by a side word
    (right/left/R/L, as a separate word anywhere: ``right_kidney``/``left_kidney``,
    ``Parotid_R``/``Parotid_L``); a structure named more than once per side is left out."""
    found: dict[str, dict[str, list[int]]] = {}
    for k, name in sorted(labels.items()):
        if k == 0:
            continue
        parsed = _side_and_stem(name)
        if parsed:
            side, stem = parsed
            found.setdefault(stem, {"R": [], "L": []})[side].append(k)
    pairs = [(s["R"][0], s["L"][0]) for s in found.values() if len(s["R"]) == 1 and len(s["L"]) == 1]
    return tuple(sorted(pairs))


def check_lateral_pairs(pairs: Sequence[Sequence[int]], labels: dict[int, str], kind: str,
                        key: str = "task.lateral_pairs") -> tuple[tuple[int, int], ...]:
    """Validated ``(right_id, left_id)`` pairs: two different foreground ids each, no id twice."""
    pairs = [list(p) for p in pairs]
    if pairs and kind == CLASSIFICATION:
        raise ConfigError(f"{key}: lateral pairs are label ids of a segmentation task; a classification task has none")
    out, seen = [], set()
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            raise ConfigError(f"{key}: expected pairs of two label ids [[right, left], ...], got {pairs!r}")
        a, b = p
        bad = [i for i in (a, b) if i not in labels or i == 0]
        if bad or a == b:
            raise ConfigError(f"{key}: pair {p} must name two different organ ids among "
                              f"{', '.join(f'{k}={v}' for k, v in labels.items() if k)}")
        if {a, b} & seen:
            raise ConfigError(f"{key}: label id(s) {sorted({a, b} & seen)} appear in more than one pair ({pairs!r})")
        seen |= {a, b}
        out.append((a, b))
    return tuple(out)


def default_geometry(name: str, *, phantom: bool = False, device: str = "") -> tuple[tuple[float, ...], tuple[int, ...], str]:
    """Preset ``(spacing, roi, why)`` of task ``name``: the CPU-sized geometry for the phantom
    cohort or for ``device="cpu"``, the GPU geometry otherwise (``""``: not known, GPU)."""
    p = TASK_PRESETS[name]
    if phantom and (p.cpu_spacing or p.cpu_roi):
        return p.cpu_spacing or p.spacing, p.cpu_roi or p.roi, "CPU-sized geometry of the embedded phantom cohort"
    if device == "cpu" and (p.cpu_spacing or p.cpu_roi):
        return (p.cpu_spacing or p.spacing, p.cpu_roi or p.roi,
                "training on the CPU (train.device resolves to cpu): CPU-sized default geometry; "
                f"a GPU run would use spacing {list(p.spacing)} mm, roi {list(p.roi)}")
    return p.spacing, p.roi, ("training on CUDA: the task's GPU geometry" if device == "cuda"
                              else "the task's GPU geometry")


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
    lateral_pairs: Sequence[Sequence[int]] | None = None,
    device: str = "",
) -> TaskSpec:
    """Preset values, overridden by whatever is given non-empty.

    ``phantom`` or ``device="cpu"`` pick the preset's CPU-sized geometry for whatever of
    ``spacing``/``roi`` is not given. ``lateral_pairs`` None: the preset's pairs (custom: the
    pairs found in the label names, :func:`lateral_pairs_from_names`); ``[]``: none.
    """
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
    default_spacing, default_roi, why = default_geometry(name, phantom=phantom, device=device)
    given = [k for k, v in (("task.spacing", spacing), ("task.roi", roi)) if v]
    spacing = tuple(float(s) for s in spacing) or default_spacing
    roi = tuple(int(r) for r in roi) or default_roi
    if device or phantom:
        log.info("task %s geometry: spacing %s mm, roi %s (%s)", name, list(spacing) or "as stored", list(roi),
                 f"{' and '.join(given)} as set" if len(given) == 2
                 else f"{given[0]} as set, the other: {why}" if given else why)
    hu = tuple(float(h) for h in hu_window) or p.hu_window
    if len(hu) != 2 or hu[0] >= hu[1]:
        raise ConfigError(f"task.hu_window: expected [low, high] with low < high, got {list(hu)}")
    if any(r < 1 for r in roi):
        raise ConfigError(f"task.roi: expected positive sizes, got {list(roi)}")
    if p.kind == SEGMENTATION and len(spacing) != len(roi):
        raise ConfigError(f"task.spacing {list(spacing)} and task.roi {list(roi)} need the same number of axes")
    if any(s <= 0 for s in spacing):
        raise ConfigError(f"task.spacing: expected positive millimetres, got {list(spacing)}")
    if lateral_pairs is not None:
        pairs = check_lateral_pairs(lateral_pairs, label_map, p.kind)
    elif name == "custom":
        pairs = lateral_pairs_from_names(label_map)
        if pairs:
            log.info("task custom: lateral pairs from the label names (exchanged by left-right flips): %s; "
                     "task.lateral_pairs=[] turns this off", ", ".join(f"{label_map[a]}/{label_map[b]}" for a, b in pairs))
    else:
        pairs = p.lateral_pairs
    tol = float(nsd_tolerance_mm) if nsd_tolerance_mm > 0 else p.nsd_tolerance_mm
    per_organ = dict(nsd_tolerance_per_organ or {})
    organs = [v for k, v in label_map.items() if k != 0 or p.kind == CLASSIFICATION]
    unknown = sorted(set(per_organ) - set(organs))
    if unknown:
        raise ConfigError(f"task.nsd_tolerance_per_organ: unknown organ(s) {unknown}; task {name!r} has {organs}")
    tolerances = {o: float(per_organ.get(o, tol)) for o in organs} if p.kind == SEGMENTATION else {}
    return TaskSpec(
        name=name, kind=p.kind, labels=label_map, spacing=spacing, roi=roi, hu_window=(hu[0], hu[1]),
        datalist_name=datalist_name or "dataset_0.json", nsd_tolerance_mm=tolerances, lateral_pairs=pairs,
    )
