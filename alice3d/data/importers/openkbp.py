"""OpenKBP (AAPM 2020 knowledge-based planning challenge) -> NIfTI in HU + a Decathlon datalist.

The challenge ships each patient as sparse CSVs under
``provided-data/{train-pats,validation-pats,test-pats}/pt_N/``: the first column is the flat
index into a C-order 128x128x128 array, the second the value (``ct.csv``) or nothing (a
structure mask). ``voxel_dimensions.csv`` holds the three spacings (mm). A structure the
planner did not contour has no file: absent means *unknown*, not background, so every case
records the organs it contours (``"contoured"`` in the datalist entry).

Facts checked on the released data (and re-checked per case, see :func:`anatomy_problems`):
- CT values are HU + 1024 with 0 outside the body contour, so HU = value - 1024 and outside
  the contour becomes -1024 (air).
- Array axis 0 runs anterior -> posterior (the mandible has a smaller index than the spinal
  cord), axis 1 right -> left (the left parotid has the larger index), axis 2 superior ->
  inferior (the brainstem has the smaller index); spacings are (in-plane, in-plane, slice).
  The RAS affine below encodes exactly that; the CSVs carry no world origin, so the volume
  is centred on the world origin.

    import_openkbp(src, out) -> ImportResult
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alice3d.data.io import save_nifti
from alice3d.errors import DataError
from alice3d.runtime import Progress, atomic_write

log = logging.getLogger("alice3d.data")

__all__ = ["OARS", "SPLITS", "ImportResult", "anatomy_problems", "find_root", "import_openkbp", "openkbp_affine",
           "read_patient"]

SHAPE = (128, 128, 128)
HU_OFFSET = 1024.0  # stored value = HU + 1024
OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
LABELS = {"0": "background", **{str(i + 1): name for i, name in enumerate(OARS)}}
# The challenge's split, kept: labelled pools are drawn from train-pats, checkpoints chosen on
# validation-pats, and test-pats are reported only.
SPLITS = {"train-pats": "training", "validation-pats": "validation", "test-pats": "test"}
DATALIST = "dataset.json"


def find_root(src: str | os.PathLike) -> Path:
    """The ``provided-data`` folder of a clone of the repository, or ``src`` itself when it is one."""
    src = Path(src)
    for cand in (src, src / "provided-data"):
        if any((cand / s).is_dir() for s in SPLITS):
            return cand
    raise DataError(f"{src}: no OpenKBP data here: expected a clone of the open-kbp repository or its "
                    f"provided-data/ folder, holding {', '.join(f'{s}/' for s in SPLITS)}")


def openkbp_affine(spacing) -> np.ndarray:
    """(4, 4) RAS voxel -> world affine of a 128^3 OpenKBP array with ``spacing`` (in-plane, in-plane, slice) mm.

    Axis 0 -> posterior (-y), axis 1 -> patient left (-x), axis 2 -> inferior (-z); centred on the origin.
    """
    s0, s1, s2 = (float(v) for v in spacing)
    aff = np.zeros((4, 4))
    aff[1, 0], aff[0, 1], aff[2, 2], aff[3, 3] = -s0, -s1, -s2, 1.0
    centre = (np.asarray(SHAPE, dtype=np.float64) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def _read_csv(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat indices, values or None) of one sparse CSV; DataError naming the file when it is malformed."""
    try:
        with open(path) as f:
            f.readline()  # ",data" header
            rows = np.loadtxt(f, delimiter=",", usecols=(0, 1) if with_values else (0,), ndmin=2, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable OpenKBP CSV ({e}); expected 'index,value' rows after a header") from None
    idx = rows[:, 0]
    if idx.size and (idx.min() < 0 or idx.max() >= np.prod(SHAPE) or np.any(idx != np.rint(idx))):
        raise DataError(f"{path}: indices outside a 128^3 array (min {idx.min():g}, max {idx.max():g})")
    return idx.astype(np.int64), (rows[:, 1] if with_values else None)


def read_spacing(folder: Path) -> tuple[float, float, float]:
    path = folder / "voxel_dimensions.csv"
    try:
        vals = np.loadtxt(path, dtype=np.float64).ravel()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable voxel dimensions ({e})") from None
    if vals.shape != (3,) or not np.all(np.isfinite(vals)) or vals.min() <= 0:
        raise DataError(f"{path}: expected three positive spacings in mm, got {vals.tolist()}")
    return tuple(float(v) for v in vals)


def read_patient(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(hu (128,128,128) int16, label uint8, affine (4, 4) RAS, contoured organ names)`` of one patient folder."""
    folder = Path(folder)
    if not (folder / "ct.csv").is_file():
        raise DataError(f"{folder}: no ct.csv")
    spacing = read_spacing(folder)
    idx, values = _read_csv(folder / "ct.csv", with_values=True)
    hu = np.full(int(np.prod(SHAPE)), -HU_OFFSET, dtype=np.float32)
    hu[idx] = values - HU_OFFSET
    masks = {}
    for name in OARS:
        path = folder / f"{name}.csv"
        if path.is_file():
            masks[name] = _read_csv(path, with_values=False)[0]
    label = np.zeros(int(np.prod(SHAPE)), dtype=np.uint8)
    # Smaller structures are written last, so where two contours overlap the smaller organ keeps
    # its voxels (a parotid inside a generous mandible contour is still a parotid).
    for name in sorted(masks, key=lambda n: -len(masks[n])):
        label[masks[name]] = OARS.index(name) + 1
    hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16).reshape(SHAPE)
    return hu, label.reshape(SHAPE), openkbp_affine(spacing), [n for n in OARS if n in masks]


def _centroid(label: np.ndarray, affine: np.ndarray, name: str) -> np.ndarray | None:
    ijk = np.argwhere(label == OARS.index(name) + 1)
    if not len(ijk):
        return None
    return affine[:3, :3] @ ijk.mean(0) + affine[:3, 3]


def anatomy_problems(label: np.ndarray, affine: np.ndarray) -> list[str]:
    """What contradicts the axes in ``affine`` (RAS): the mandible anterior to the spinal cord, the
    brainstem superior to the larynx (and to the spinal cord), the left parotid on the patient's
    left of the right one. Checks whose organs a case lacks are skipped."""
    c = {n: _centroid(label, affine, n) for n in OARS}
    checks = [("Mandible", "SpinalCord", 1, "the mandible is not anterior to the spinal cord"),
              ("Brainstem", "Larynx", 2, "the brainstem is not superior to the larynx"),
              ("Brainstem", "SpinalCord", 2, "the brainstem is not superior to the spinal cord"),
              ("RightParotid", "LeftParotid", 0, "the left parotid is not on the patient's left of the right one")]
    # RAS: +y anterior, +z superior, +x patient right
    return [msg for a, b, axis, msg in checks if c[a] is not None and c[b] is not None and c[a][axis] <= c[b][axis]]


@dataclass
class ImportResult:
    out: Path
    datalist: Path
    cases: dict[str, int] = field(default_factory=dict)  # split -> cases written or already there
    imported: int = 0  # written by this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patient folder, reason)


def _entry(name: str, contoured: list[str]) -> dict:
    return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz",
            "contoured": [OARS.index(n) + 1 for n in contoured]}


def _patient_folders(root: Path) -> list[tuple[str, Path]]:
    def number(p: Path) -> tuple[int, str]:
        tail = p.name.rsplit("_", 1)[-1]
        return (int(tail), p.name) if tail.isdigit() else (1 << 30, p.name)

    out = []
    for split in SPLITS:
        d = root / split
        if d.is_dir():
            out += [(split, p) for p in sorted((q for q in d.iterdir() if q.is_dir()), key=number)]
    return out


def import_openkbp(src: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> ImportResult:
    """Write ``out/imagesTr/pt_N.nii.gz`` (HU, int16), ``out/labelsTr/pt_N.nii.gz`` (the 7 OARs, uint8) and
    ``out/dataset.json`` for every patient with a ``ct.csv``; resumable (a case whose two files and record
    exist is kept). Patients without ``ct.csv``, or whose contours contradict the axes, are listed and skipped."""
    root = find_root(src)
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    records_dir = out / ".cases"  # one small record per finished case: what makes a rerun resume
    records_dir.mkdir(exist_ok=True)
    folders = _patient_folders(root)
    if not folders:
        raise DataError(f"{root}: no patient folders under {', '.join(SPLITS)}")
    result = ImportResult(out, out / DATALIST)
    splits: dict[str, list[dict]] = {v: [] for v in SPLITS.values()}
    with Progress(len(folders), "import openkbp", unit="patient", logger=log, enabled=progress) as bar:
        for split, folder in folders:
            name = folder.name
            record = records_dir / f"{name}.json"
            try:
                if record.is_file() and (out / "imagesTr" / f"{name}.nii.gz").is_file() \
                        and (out / "labelsTr" / f"{name}.nii.gz").is_file():
                    entry = json.loads(record.read_text())
                else:
                    entry = _import_one(folder, name, out)
                    with atomic_write(record, "w", file_mode=0o644) as f:
                        json.dump(entry, f)
                    result.imported += 1
                splits[SPLITS[split]].append(entry)
            except DataError as e:
                reason = str(e).removeprefix(f"{folder}: ")
                result.skipped.append((f"{split}/{name}", reason))
                log.warning("skipped %s/%s: %s", split, name, reason)
            bar.update(1)
    result.cases = {k: len(v) for k, v in splits.items()}
    doc = {"name": "OpenKBP", "description": "OpenKBP head-and-neck planning CTs (AAPM 2020 challenge), 7 organs at "
                                             "risk; 'contoured' lists the labels each case contours (others unknown)",
           "reference": "Babier et al., Med Phys 2021; github.com/ababier/open-kbp",
           "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": LABELS,
           "numTraining": len(splits["training"]), "numValidation": len(splits["validation"]),
           "numTest": len(splits["test"]), **splits,
           "skipped": [{"patient": p, "reason": r} for p, r in result.skipped]}
    with atomic_write(result.datalist, "w", file_mode=0o644) as f:
        json.dump(doc, f, indent=1)
    return result


def _import_one(folder: Path, name: str, out: Path) -> dict:
    hu, label, affine, contoured = read_patient(folder)
    problems = anatomy_problems(label, affine)
    if problems:
        raise DataError(f"{folder}: contours contradict the OpenKBP axes ({'; '.join(problems)}); not imported")
    for sub, arr, dtype in (("imagesTr", hu, np.int16), ("labelsTr", label, np.uint8)):
        final = out / sub / f"{name}.nii.gz"
        tmp = final.with_name(f".{name}.tmp.nii.gz")
        save_nifti(arr, affine, tmp, dtype=dtype)
        os.replace(tmp, final)
    return _entry(name, contoured)
