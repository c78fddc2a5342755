"""Cases for fine-tuning: datalists, splits (k-fold, label fraction), preprocessing, samples.

A case is checked when it is prepared (readable, finite, image/label shapes and affines
agree, label ids belong to the task, something inside the HU window); a case that fails
is a :class:`~alice3d.data.io.DataError` naming its files. With ``data.on_bad_data=skip``
bad cases are listed in ``RUN/data_report.json`` and in ``results.json``; with ``fail``
the run stops before training.

:class:`TrainSamples` is the trainer's map-style dataset: sample ``i`` is a random ROI
crop (MONAI BTCV recipe) of case ``perm_e[i % n]`` with ``e = i // n`` an epoch
permutation, every random draw seeded by ``(seed, i)``, so a sample is a pure function
of its index.

Partial labels: a datalist entry may list the foreground ids its label map contours
(``"contoured": [1, 2, 5]``); the other classes of that case are unknown, not background.
Each prepared case and training sample carries them as ``known`` ``(K,)`` bool (id 0 always
True; an entry without the list knows every class), which the loss and the metrics respect.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from torch.utils.data import Dataset

from alice3d.data.datalists import scan_directory
from alice3d.data.io import DataError, load_volume
from alice3d.config import ConfigError
from alice3d.finetune.config import AugConfig, FinetuneConfig, FinetuneDataConfig
from alice3d.finetune.tasks import CLASSIFICATION, TaskSpec, resolve_task
from alice3d.finetune.transforms import KNOWN_KEY, preprocess_transforms, train_random_transforms, training_view
from alice3d.runtime import progress

log = logging.getLogger("alice3d.finetune")

_NII = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclass(frozen=True)
class Case:
    """One datalist entry; ``label`` is a label-map path (segmentation) or a class id;
    ``contoured``: the foreground ids its label map contours (None: every class)."""

    id: str
    image: str
    label: str | int | None = None
    contoured: tuple[int, ...] | None = None


@dataclass
class Prepared:
    """A preprocessed case: image ``(C, *S)`` float in [0, 1], label ``(1, *S)`` float ids
    (segmentation) or an int class (classification), on the task grid; ``known`` ``(K,)``
    bool: the classes its label map contours (segmentation; background always True)."""

    id: str
    image: torch.Tensor
    label: torch.Tensor | int
    affine: np.ndarray
    spacing: tuple[float, ...]
    source: Case = field(repr=False, default=None)  # type: ignore[assignment]
    known: torch.Tensor | None = None

    @property
    def partial(self) -> bool:
        """True when the case leaves some class unknown."""
        return self.known is not None and not bool(self.known.all())


@dataclass
class Split:
    fold: int | None
    train: list[Case]
    val: list[Case]


# ----------------------------------------------------------------------------- datalists


def case_id(path: str) -> str:
    name = Path(path).name
    for suf in _NII:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def find_datalist(data: str, task: TaskSpec | str) -> Path | None:
    """``data`` is a datalist JSON or a folder holding ``task.datalist_name`` (or dataset.json);
    None for a folder without one (a plain image folder, see :func:`folder_lists`). ``task``
    may be the datalist file name itself."""
    name = task if isinstance(task, str) else task.datalist_name
    p = Path(data).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (name, "dataset.json"):
            if (p / candidate).is_file():
                return p / candidate
        return None
    raise DataError(f"{p}: data not found (expected a datalist JSON, a folder with {name} "
                    "or a folder with imagesTr/ and labelsTr/)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the datalist: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed datalist JSON ({e})") from None


def datalist_labels(path: str | Path) -> dict[int, str] | None:
    """The Decathlon ``labels`` field of a datalist (``{"0": "background", "1": "Brainstem"}``)
    as ``{0: "background", 1: "Brainstem"}``; None when the datalist has none. The ids must be
    0..K without gaps (they are the network's output channels)."""
    path = Path(path)
    data = _read_json(path)
    raw = data.get("labels") if isinstance(data, dict) else None
    if raw is None:
        return None
    expected = 'expected {"0": "background", "1": "NAME", ...} with ids 0..K'
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'labels' must be a non-empty object; {expected}, got {raw!r}")
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            i = int(str(k).strip())
        except ValueError:
            raise DataError(f"{path}: 'labels' key {k!r} is not a label id; {expected}") from None
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{path}: 'labels' entry {k!r} has no name ({v!r}); {expected}")
        out[i] = v.strip()
    if sorted(out) != list(range(len(out))) or len(out) < 2:
        raise DataError(f"{path}: 'labels' ids {sorted(out)} are not 0..K without gaps (K >= 1); {expected}")
    return dict(sorted(out.items()))


def _same_names(a: Sequence[str], b: Sequence[str]) -> bool:
    return [n.strip().lower() for n in a] == [n.strip().lower() for n in b]


def custom_label_names(data: str, configured: Sequence[str], datalist_name: str) -> list[str]:
    """Organ names of ids 1..K of a custom task: ``task.labels`` when given, else the
    datalist's ``labels``; both given and different is a ConfigError naming both."""
    configured = [str(n).strip() for n in configured if str(n).strip().lower() != "background"]
    path = find_datalist(data, datalist_name or "dataset_0.json") if data else None
    found = datalist_labels(path) if path is not None else None
    if found is None:
        return configured
    names = [v for k, v in found.items() if k != 0]
    if not configured:
        log.info("task custom: %d classes from the 'labels' of %s: %s", len(found), path,
                 ", ".join(f"{k}={v}" for k, v in found.items()))
        return names
    if not _same_names(configured, names):
        raise ConfigError(
            f"task.labels {configured} disagree with the 'labels' of {path} "
            f"({', '.join(f'{k}={v}' for k, v in found.items() if k)}): drop task.labels to use the datalist's "
            "names, or make the two lists name the same organs in the same id order"
        )
    return configured


def device_type(name: str) -> str:
    """``train.device`` -> ``"cpu"`` or ``"cuda"`` (``auto``: CUDA when available); the trainer
    reports an unusable value."""
    name = str(name).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu" if name == "cpu" else ""


def task_from_config(cfg: FinetuneConfig) -> TaskSpec:
    """The task of ``cfg``, with what was left empty filled in from what is used: geometry
    (for the device ``train.device`` resolves to, or the phantom cohort), a custom task's label
    names (from the datalist's ``labels`` when ``task.labels`` is empty) and the lateral pairs."""
    t = cfg.task
    labels = list(t.labels)
    if t.name == "custom":
        labels = custom_label_names(cfg.data.data, labels, t.datalist)
    task = resolve_task(t.name, labels=labels, spacing=t.spacing, roi=t.roi, hu_window=t.hu_window,
                        nsd_tolerance_mm=t.nsd_tolerance_mm, nsd_tolerance_per_organ=t.nsd_tolerance_per_organ,
                        datalist_name=t.datalist, phantom=not cfg.data.data, lateral_pairs=t.lateral_pairs,
                        device=device_type(cfg.train.device))
    t.spacing, t.roi, t.hu_window = tuple(task.spacing), tuple(task.roi), tuple(task.hu_window)
    t.lateral_pairs = [list(p) for p in task.lateral_pairs]
    if t.name == "custom":
        t.labels = list(task.foreground.values())
    return task


def validation_count(n: int) -> int:
    """Validation cases of a folder without a datalist: 20 %, at least 1 (24/6 for BTCV's 30)."""
    return max(1, int(round(0.2 * n)))


def folder_lists(folder: str | Path, task: TaskSpec) -> dict[str, list[Case]]:
    """A plain folder without a datalist -> ``{"training", "validation", "test"}``.

    Images of ``imagesTr/`` (or of the folder itself) are paired with the labels of the
    sibling ``labelsTr/`` by :func:`alice3d.data.datalists.scan_directory` (same file name,
    or ``img`` -> ``label``); in file-name order, the last :func:`validation_count` cases
    validate and the others train.
    """
    folder = Path(folder).expanduser()
    expected = (f"expected a {task.datalist_name} (a Decathlon-style datalist with 'training' and 'validation' "
                'lists of {"image": ..., "label": ...}) or imagesTr/ + labelsTr/ folders')
    if task.kind == CLASSIFICATION:
        raise DataError(f"{folder}: folder has no {task.datalist_name} or dataset.json; a classification task needs "
                        'a datalist whose entries carry the class ids ({"image": ..., "label": CLASS_ID})')
    entries = scan_directory(folder)
    if not entries:
        raise DataError(f"{folder}: folder has no {task.datalist_name} or dataset.json and no images; {expected}")
    unpaired = [Path(e["image"]).name for e in entries if "label" not in e]
    if unpaired:
        raise DataError(f"{folder}: no label map in labelsTr/ for {len(unpaired)} image(s): "
                        f"{', '.join(unpaired[:5])}{' ...' if len(unpaired) > 5 else ''} (labels are looked up in "
                        "the labelsTr/ folder beside imagesTr/, under the image's file name or with 'img' -> 'label'; "
                        f"or write a {task.datalist_name})")
    if len(entries) < 2:
        raise DataError(f"{folder}: only 1 labelled case; training and validation need at least 2")
    cases = [Case(id=case_id(e["image"]), image=e["image"], label=e["label"]) for e in entries]
    _check_unique(cases, str(folder))
    n_val = validation_count(len(cases))
    train, val = cases[:-n_val], cases[-n_val:]
    log.info("%s: no %s; paired %d images with their labelsTr/ label maps; validation = the last %d in file-name "
             "order (%s), training = the other %d", folder, task.datalist_name, len(cases), n_val,
             ", ".join(c.id for c in val), len(train))
    return {"training": train, "validation": val, "test": []}


def load_lists(data: str, task: TaskSpec) -> tuple[dict[str, list[Case]], str]:
    """The cases of ``data`` (a datalist JSON, a folder holding one, or a plain image folder),
    and the name of their source for messages."""
    datalist = find_datalist(data, task)
    if datalist is None:
        return folder_lists(data, task), str(Path(data).expanduser())
    return read_datalist(datalist, task), str(datalist)


def _resolve(base: Path, p: Any) -> str:
    """A datalist path: absolute as given, else relative to the datalist's folder."""
    q = Path(str(p))
    return str(q if q.is_absolute() else (base / q).resolve())


def known_classes(contoured: Sequence[int] | None, num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` bool: background and the ``contoured`` ids True (None: all True)."""
    known = torch.ones(num_classes, dtype=torch.bool)
    if contoured is not None:
        known[1:] = False
        known[list(contoured)] = True
    return known


def _contoured(item: dict, path: Path, key: str, i: int, task: TaskSpec) -> tuple[int, ...] | None:
    """The entry's ``contoured`` ids, checked against the task's foreground ids."""
    raw = item.get("contoured")
    if raw is None:
        return None
    ids = sorted(task.foreground)
    where = f"{path}: entry {i} of '{key}' ({item['image']})"
    expected = f"expected a list of the foreground label ids the case contours, from {ids}, e.g. [1, 2]"
    if not isinstance(raw, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in raw):
        raise DataError(f"{where} has 'contoured' {raw!r}; {expected}")
    bad = sorted({v for v in raw if v != 0 and v not in task.foreground})
    if bad:
        raise DataError(f"{where} has 'contoured' ids {bad} that are not foreground labels of task "
                        f"{task.name!r}; {expected}")
    return tuple(sorted({v for v in raw if v != 0}))  # background is always known


def _entry(item: Any, base: Path, path: Path, key: str, i: int, task: TaskSpec) -> Case:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        raise DataError(f"{path}: entry {i} of '{key}' must be an object with an 'image' key, got {item!r}")
    image = _resolve(base, item["image"])
    label = item.get("label")
    if task.kind == CLASSIFICATION:
        if isinstance(label, list) and len(label) == 1:
            label = label[0]
        try:
            label = None if label is None else int(label)
        except (TypeError, ValueError):
            raise DataError(f"{path}: entry {i} of '{key}' ({item['image']}) has label {label!r}; "
                            "expected an integer class id") from None
        if label is None and key != "test":
            raise DataError(f"{path}: entry {i} of '{key}' ({item['image']}) needs an integer 'label' class id")
    elif label is not None:
        label = _resolve(base, label)
    elif key != "test":
        raise DataError(f"{path}: entry {i} of '{key}' ({item['image']}) has no 'label' map")
    contoured = _contoured(item, path, key, i, task) if task.kind != CLASSIFICATION else None
    return Case(id=case_id(image), image=image, label=label, contoured=contoured)


def read_datalist(path: str | Path, task: TaskSpec) -> dict[str, list[Case]]:
    """Decathlon/BTCV datalist -> ``{"training": [...], "validation": [...], "test": [...]}``.

    Paths are relative to the datalist's folder (MONAI's convention).
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise DataError(f"{path}: expected a JSON object with a 'training' list (Decathlon/BTCV datalist)")
    out: dict[str, list[Case]] = {}
    for key in ("training", "validation", "test"):
        items = data.get(key) or []
        if not isinstance(items, list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(items).__name__}")
        out[key] = [_entry(it, path.parent, path, key, i, task) for i, it in enumerate(items)]
    _check_unique(out["training"] + out["validation"], str(path))
    return out


def _check_unique(cases: Sequence[Case], source: str) -> None:
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"{source}: case ids appear more than once across training/validation: {dup}")


# ----------------------------------------------------------------------------- splits


def labeled_subset(cases: Sequence[Case], fraction: float = 1.0, n_labeled: int = 0, seed: int = 0) -> list[Case]:
    """A deterministic subset of the training cases (few-label studies), in datalist order."""
    cases = list(cases)
    n = int(n_labeled) if n_labeled > 0 else max(1, int(round(fraction * len(cases))))
    if n >= len(cases):
        return cases
    keep = set(np.random.default_rng(seed + 7_777).choice(len(cases), size=n, replace=False).tolist())
    return [c for i, c in enumerate(cases) if i in keep]


def make_splits(lists: dict[str, list[Case]], cfg: FinetuneDataConfig, source: str = "datalist") -> list[Split]:
    """Datalist split, or k folds over training+validation; label subset applied to training."""
    if cfg.kfold:
        pool = sorted(lists["training"] + lists["validation"], key=lambda c: c.id)
        if len(pool) < cfg.kfold:
            raise DataError(f"{source}: {len(pool)} cases cannot make data.kfold={cfg.kfold} folds")
        order = np.random.default_rng(cfg.split_seed).permutation(len(pool))
        folds = [sorted(part.tolist()) for part in np.array_split(order, cfg.kfold)]
        chosen = range(cfg.kfold) if cfg.fold < 0 else [cfg.fold]
        splits = []
        for f in chosen:
            val_idx = set(folds[f])
            train = [c for i, c in enumerate(pool) if i not in val_idx]
            val = [c for i, c in enumerate(pool) if i in val_idx]
            splits.append(Split(f, labeled_subset(train, cfg.label_fraction, cfg.n_labeled, cfg.split_seed), val))
        return splits
    if not lists["validation"]:
        raise DataError(f"{source}: the datalist has no 'validation' cases; add them or use data.kfold=5")
    train = labeled_subset(lists["training"], cfg.label_fraction, cfg.n_labeled, cfg.split_seed)
    return [Split(None, train, list(lists["validation"]))]


# ----------------------------------------------------------------------------- preparation


def _meta_tensor(array: np.ndarray, affine: np.ndarray, path: str):
    # "no_channel" as LoadImaged records it: without it MONAI 1.6 counts one spatial axis less
    # for a channel-less tensor and crops then forget to shift the last axis of the affine.
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
                      affine=torch.tensor(np.asarray(affine), dtype=torch.float64),
                      meta={"filename_or_obj": path, "original_channel_dim": "no_channel"})


def check_label_ids(label: np.ndarray, task: TaskSpec, path: str) -> None:
    ids = set(np.unique(label).astype(int).tolist())
    extra = sorted(ids - set(task.labels))
    if extra:
        raise DataError(
            f"{path}: label ids {extra} are not labels of task {task.name!r} "
            f"(expected ids {sorted(task.labels)}: {', '.join(f'{k}={v}' for k, v in task.labels.items())})"
        )


def check_contoured(label: np.ndarray, case: Case, task: TaskSpec) -> None:
    """A label map may hold only background and the ids its case contours."""
    if case.contoured is None:
        return
    ids = set(np.unique(label).astype(int).tolist())
    extra = sorted(ids - {0, *case.contoured})
    if extra:
        names = ", ".join(f"{k}={task.labels[k]}" for k in extra if k in task.labels)
        raise DataError(f"{case.label}: label ids {extra} ({names}) are drawn but the datalist entry's 'contoured' "
                        f"list is {list(case.contoured)}; a class a case does not contour cannot have voxels: add the "
                        "ids to 'contoured' (or drop the list if the case contours every class)")


def prepare_case(case: Case, task: TaskSpec) -> Prepared:
    """Load, check and preprocess one case (raises DataError naming its files)."""
    seg = task.kind != CLASSIFICATION
    vol = load_volume(case.image, case.label if seg else None, reject_constant=True)
    lo = task.hu_window[0]
    if not (vol.array > lo).any():
        raise DataError(f"{case.image}: no voxel above {lo:g} HU, the low end of task {task.name!r}'s window "
                        f"{list(task.hu_window)}; is this a CT in Hounsfield units?")
    data = {"image": _meta_tensor(vol.array, vol.affine, case.image)}
    if seg:
        check_label_ids(vol.label, task, str(case.label))
        check_contoured(vol.label, case, task)
        data["label"] = _meta_tensor(vol.label, vol.affine, str(case.label))
    elif case.label not in task.labels:
        raise DataError(f"{case.image}: class label {case.label!r} is not a class of task {task.name!r} "
                        f"(expected one of {sorted(task.labels)})")
    out = Compose(preprocess_transforms(task, keys=list(data)))(data)
    image = out["image"]
    affine = np.asarray(image.affine, dtype=np.float64)
    nd = image.ndim - 1
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:nd, :nd], axis=0))
    label: torch.Tensor | int = out["label"].as_tensor().float().contiguous() if seg else int(case.label)
    known = known_classes(case.contoured, task.num_classes) if seg else None
    return Prepared(case.id, image.as_tensor().float().contiguous(), label, affine, spacing, case, known)


def prepare_cases(cases: Sequence[Case], task: TaskSpec, on_bad_data: str, what: str) -> tuple[list[Prepared], dict[str, str]]:
    """Prepare every case; bad ones are collected (skip) or stop the run (fail)."""
    good, bad = [], {}
    for case in progress(list(cases), desc=f"preparing {what} cases", unit="case", logger=log, leave=False):
        try:
            good.append(prepare_case(case, task))
        except DataError as e:
            bad[case.id] = str(e)
            if on_bad_data == "fail":
                raise DataError(f"bad {what} case {case.id}: {e} (data.on_bad_data=fail stops the run; "
                                "set data.on_bad_data=skip to leave bad cases out and list them)") from None
            log.warning("bad %s case %s left out: %s", what, case.id, e)
    if not good:
        raise DataError(f"no usable {what} case: all {len(bad)} failed validation:\n  "
                        + "\n  ".join(f"{k}: {v}" for k, v in bad.items()))
    return good, bad


# ----------------------------------------------------------------------------- samples


def sample_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 2_654_435_761 + 12_345) % (2**32 - 1)


class TrainSamples(Dataset):
    """Map-style dataset of training samples ``{"image": (C, *roi), "label": (1, *roi) | ()}``,
    segmentation samples with ``"known": (K,)`` bool too (the classes the case contours,
    exchanged with the labels by lateral flips; all True for a case without a ``known``).

    ``get_case(k)`` returns case k (segmentation: as :func:`training_view`, classification:
    a :class:`Prepared`).
    """

    def __init__(self, n_cases: int, get_case: Callable[[int], Any], task: TaskSpec, aug: AugConfig, seed: int = 0):
        if n_cases < 1:
            raise DataError("no training cases")
        self.n, self.get_case, self.task, self.seed = n_cases, get_case, task, seed
        self.random = train_random_transforms(task, aug)

    def __len__(self) -> int:
        return self.n

    def case_index(self, i: int) -> int:
        epoch, pos = divmod(int(i), self.n)
        return int(np.random.default_rng((self.seed, epoch)).permutation(self.n)[pos])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        case = self.get_case(self.case_index(i))
        self.random.set_random_state(seed=sample_seed(self.seed, int(i)))
        if self.task.kind == CLASSIFICATION:
            out = self.random({"image": case.image})
            return {"image": _plain(out["image"]).float().contiguous(), "label": torch.tensor(int(case.label))}
        out = self.random(dict(case))
        if isinstance(out, list):
            out = out[0]
        known = out.get(KNOWN_KEY)
        known = torch.ones(self.task.num_classes, dtype=torch.bool) if known is None else _plain(known).bool()
        return {"image": _plain(out["image"]).float().contiguous(), "label": _plain(out["label"]).float().contiguous(),
                "known": known}


def _plain(x: Any) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.clone()


def _for_training(case: Prepared, task: TaskSpec) -> Any:
    if task.kind == CLASSIFICATION:
        return case
    view = training_view(case.image, case.label, task, seed=zlib.crc32(case.id.encode()))
    if case.known is not None:
        view[KNOWN_KEY] = case.known.clone()
    return view


def case_store(cases: Sequence[Case], prepared: Sequence[Prepared] | None, task: TaskSpec) -> Callable[[int], Any]:
    """``k -> training case`` (see :class:`TrainSamples`): from memory when ``prepared`` is
    given (cached), else read and preprocessed on every call."""
    if prepared is not None:
        items = [_for_training(c, task) for c in prepared]
        return items.__getitem__
    cases = list(cases)
    return lambda k: _for_training(prepare_case(cases[k], task), task)
