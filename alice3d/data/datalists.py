"""Datalists: Decathlon/BTCV JSON files or plain folders of images -> lists of {"image", "label"}.

Paths in the returned entries are absolute strings. A folder holding a `dataset_0.json`
(or `dataset.json`) is read through that file, so a generated phantom cohort and a BTCV
download work the same way as `--data DIR`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from monai.data import load_decathlon_datalist

from .io import IMAGE_SUFFIXES, DataError, is_dicom_dir, is_dicom_file

BTCV_ORGANS = {
    1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_veins", 11: "pancreas", 12: "right_adrenal_gland",
    13: "left_adrenal_gland",
}
BTCV_LABELS = {"0": "background", **{str(k): v for k, v in BTCV_ORGANS.items()}}
DATALIST_NAMES = ("dataset_0.json", "dataset.json")


def _is_image_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: datalist file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read datalist: {e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON datalist: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with a list per split, got {type(doc).__name__}")
    return doc


def _load_json_datalist(path: Path, key: str, base_dir, check_exists: bool = True) -> list[dict]:
    doc = _read_json(path)
    if key not in doc:
        splits = [k for k, v in doc.items() if isinstance(v, list)]
        raise DataError(f"{path}: no {key!r} list in the datalist (found: {splits})")
    if not isinstance(doc[key], list):
        raise DataError(f"{path}: {key!r} must be a list of entries, got {type(doc[key]).__name__}")
    for i, e in enumerate(doc[key]):
        if not isinstance(e, (dict, str)) or (isinstance(e, dict) and "image" not in e):
            raise DataError(f"{path}: {key}[{i}] must be a path or an object with an 'image' key, got {e!r}")
    if not doc[key]:  # MONAI's loader indexes the first entry of "test" lists
        return []
    base = Path(base_dir) if base_dir is not None else path.parent
    entries = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(base))
    out = []
    for e in entries:
        e = dict(e)
        for k in ("image", "label"):
            if k in e and isinstance(e[k], str):
                e[k] = str(Path(e[k]).resolve())
                if check_exists and not os.path.exists(e[k]):
                    raise DataError(f"{path}: {k} file listed under {key!r} does not exist: {e[k]}")
        out.append(e)
    return out


def _label_for(image: Path, label_dir: Path | None) -> Path | None:
    if label_dir is None or not label_dir.is_dir():
        return None
    name = image.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else image.stem
    ext = name[len(stem):]
    candidates = [name, name.replace("img", "label", 1), stem.rsplit("_0000", 1)[0] + ext, stem.replace("image", "label", 1) + ext]
    for c in candidates:
        p = label_dir / c
        if p.exists():
            return p
    return None


def scan_directory(directory: str | os.PathLike) -> list[dict]:
    """Images in a folder (NIfTI, .mha/.mhd, .nrrd, DICOM series folders), labels paired from labelsTr."""
    d = Path(directory)
    if (d / "imagesTr").is_dir():
        img_dir, lab_dir = d / "imagesTr", d / "labelsTr"
    else:
        img_dir = d
        lab_dir = d.parent / "labelsTr" if d.name == "imagesTr" else None
    items = []
    for p in sorted(img_dir.iterdir()):
        if _is_image_file(p) or (p.is_dir() and p.name not in ("labelsTr", "imagesTs") and is_dicom_dir(p)):
            items.append(p)
    if not items and is_dicom_dir(img_dir):
        items = [img_dir]
    out = []
    for p in items:
        e = {"image": str(p.resolve())}
        lab = _label_for(p, lab_dir) if p.is_file() else None
        if lab is not None:
            e["label"] = str(lab.resolve())
        out.append(e)
    return out


def load_datalist(path_or_dir: str | os.PathLike, key: str = "training", base_dir: str | os.PathLike | None = None,
                  check_exists: bool = True) -> list[dict]:
    """Entries {"image": abs path[, "label": abs path]} of a datalist JSON split or an image folder.

    A folder with dataset_0.json / dataset.json is read through it; otherwise every image in it
    (or in its imagesTr) is listed for key "training" and no entries for other keys. Raises
    DataError for a missing path, malformed JSON, a missing split or (``check_exists``) a listed file
    that is absent; callers that quarantine bad files themselves pass ``check_exists=False``.
    """
    p = Path(path_or_dir)
    if not p.exists():
        raise DataError(f"{p}: datalist or data directory not found")
    if p.is_dir():
        for name in DATALIST_NAMES:
            if (p / name).is_file():
                return _load_json_datalist(p / name, key, base_dir, check_exists)
        entries = scan_directory(p) if key == "training" else []
        if key == "training" and not entries:
            raise DataError(f"{p}: no images found (expected *.nii, *.nii.gz, *.mha, *.nrrd or DICOM series folders)")
        return entries
    if p.suffix.lower() == ".json":
        return _load_json_datalist(p, key, base_dir, check_exists)
    if _is_image_file(p) or is_dicom_file(p):  # one .dcm file: a (multi-frame) DICOM volume
        return [{"image": str(p.resolve())}]
    raise DataError(f"{p}: expected a datalist .json, an image file or a directory of images")


def write_btcv_datalist(
    path: str | os.PathLike,
    training: Sequence[dict],
    validation: Sequence[dict] = (),
    test: Iterable[str] = (),
    *,
    name: str = "btcv",
    description: str = "",
    labels: dict | None = None,
    **extra,
) -> Path:
    """Write a dataset_0.json in MONAI's BTCV layout (paths relative to the file's folder)."""
    path = Path(path)
    test = list(test)
    doc = {
        "description": description,
        "labels": dict(labels or BTCV_LABELS),
        "licence": extra.pop("licence", "see the data source"),
        "modality": {"0": "CT"},
        "name": name,
        "numTest": len(test),
        "numTraining": len(training) + len(validation),
        "reference": extra.pop("reference", ""),
        "release": extra.pop("release", ""),
        "tensorImageSize": "3D",
        **extra,
        "test": test,
        "training": [dict(e) for e in training],
        "validation": [dict(e) for e in validation],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


# ----------------------------------------------------------------------------- names of cases

# Suffixes dropped from a file name to name its case (the store's case folders have used these
# names since its first version: changing the list would rename cases of existing stores).
NAME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")


def _stem(name: str) -> str:
    for suffix in NAME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def display_names(paths: Sequence[str | os.PathLike], safe: bool = False, keep_suffix: bool = False) -> list[str]:
    """A short name per path: its file (or DICOM folder) name without the image suffix, and for
    names that several paths share, the nearest parent folder(s) that tell them apart in front.

    ``/d/patient1/PATIENT_DICOM`` and ``/d/patient2/PATIENT_DICOM`` -> ``patient1_PATIENT_DICOM``,
    ``patient2_PATIENT_DICOM``; a name no other path has stays as it is, so adding a case never
    renames the others unless it shares their name. ``safe``: only ``[A-Za-z0-9._-]`` in each part
    (folder names). ``keep_suffix``: the image suffix stays on (``a_scan.nii.gz``, for messages
    that name files). The same path listed twice gets the same name.
    """
    # parent folders, nearest first
    parents, stems, suffixes = [], [], []
    for p in paths:
        parts = Path(os.path.abspath(str(p).rstrip("/") or "/")).parts
        stem = _stem(parts[-1]) if parts else ""
        parents.append([(_safe(q) if safe else q) for q in reversed(parts[:-1])])
        stems.append((_safe(stem) if safe else stem) or "case")
        suffixes.append(parts[-1][len(stem):] if keep_suffix and parts else "")
    prefix: list[list[str]] = [[] for _ in stems]

    def split(group: list[int], depth: int) -> None:
        # the nearest folder level at which the group's paths differ: it names them apart
        limit = max(len(parents[i]) for i in group)
        for d in range(depth, limit):
            values = [parents[i][d] if d < len(parents[i]) else "" for i in group]
            if len(set(values)) > 1:
                break
        else:
            return  # the same path (or folders that differ only in characters `safe` replaced)
        sub: dict[str, list[int]] = {}
        for i, v in zip(group, values):
            if v:
                prefix[i].insert(0, v)
            sub.setdefault(v, []).append(i)
        for members in sub.values():
            if len(members) > 1:
                split(members, d + 1)

    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        groups.setdefault(s, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            split(members, 0)
    return ["_".join([*pre, s]) + x for pre, s, x in zip(prefix, stems, suffixes)]
