"""Accuracy of landmark point matching: phantoms with ground-truth correspondence, real CT by organ.

Analysis of the landmark layer (it sits above ``landmark/``), used by ``scripts/eval_landmark.py``,
the benchmarks and tests; nothing in the library imports it.

Phantoms: for random body points of subject A, the true location in subject B is known exactly
(:func:`alice3d.data.phantom.correspond`). Reported per method: mean radial error (mm),
median, 90th percentile and the fraction of matches within 10 mm. Methods: a landmark
model (per-pair affine, one reference fit per volume, per-point argmax), the same model
untrained, and the bounding-box baseline (same normalised position inside the body's
bounding box). Real CT with organ contours (``LabelledCase``, :func:`evaluate_organ_pairs`):
compact organs by the error of the matched centroid, elongated ones by the distance to the
structure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from alice3d.config import from_dict
from alice3d.data.geometry import apply_affine
from alice3d.data.io import load_volume
from alice3d.data.phantom import correspond, load_cohort_maps
from landmark.cohort import compose, reference_transforms
from landmark.config import ModelConfig
from landmark.model import build_model, recalibrate_norms
from landmark.preprocess import BODY_HU, prepare_array

log = logging.getLogger("alice3d.landmark")


@dataclass
class Case:
    name: str
    volume: object  # alice3d.data.io.Volume (HU)
    body_lo: np.ndarray  # (3,) world mm, axis-aligned box of the body voxels
    body_hi: np.ndarray


def body_box(volume, threshold: float = BODY_HU) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) axis-aligned bounding box of the voxels above ``threshold``."""
    idx = np.argwhere(volume.array > threshold)
    if len(idx) == 0:
        idx = np.argwhere(np.ones(volume.array.shape, dtype=bool))
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    w = volume.voxel_to_world(corners)
    return w.min(0), w.max(0)


def box_baseline(case_a: Case, case_b: Case, points: np.ndarray) -> np.ndarray:
    """Same normalised position inside the two body boxes (world axes)."""
    rel = (points - case_a.body_lo) / np.maximum(case_a.body_hi - case_a.body_lo, 1e-6)
    return case_b.body_lo + rel * (case_b.body_hi - case_b.body_lo)


def inside(volume, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
    ijk = volume.world_to_voxel(points)
    shape = np.asarray(volume.array.shape)
    return ((ijk >= -0.5 + margin) & (ijk <= shape - 0.5 - margin)).all(axis=1)


def sample_body_points(volume, n: int, rng: np.random.Generator, threshold: float = BODY_HU) -> np.ndarray:
    """``n`` world points at random body voxels (jittered within the voxel)."""
    idx = np.argwhere(volume.array > threshold)
    pick = idx[rng.choice(len(idx), size=n, replace=len(idx) < n)].astype(np.float64)
    pick += rng.uniform(-0.5, 0.5, size=pick.shape)
    return volume.voxel_to_world(pick)


def summarize(errors: np.ndarray) -> dict:
    e = np.asarray(errors, dtype=np.float64)
    return {"mre_mm": float(e.mean()), "median_mm": float(np.median(e)), "p90_mm": float(np.percentile(e, 90)),
            "within_10mm": float((e <= 10.0).mean()), "n": int(len(e))}


def load_cases(cohort_dir: str | Path) -> tuple[list[Case], dict]:
    """Volumes (HU) and subject maps of a generated phantom cohort."""
    cohort_dir = Path(cohort_dir)
    maps = load_cohort_maps(cohort_dir)
    cases = []
    for name in sorted(maps):
        path = cohort_dir / maps[name].meta.get("image", f"imagesTr/{name}.nii.gz")
        vol = load_volume(path)
        lo, hi = body_box(vol)
        cases.append(Case(name, vol, lo, hi))
    return cases, maps


def evaluate_pairs(cases: Sequence[Case], maps: dict, methods: dict[str, Callable], n_pairs: int = 20,
                   n_points: int = 50, seed: int = 0) -> dict:
    """Errors of every method on the same random (A, B, points) draws.

    ``methods``: name -> ``fn(case_a, case_b, points (N, 3)) -> predicted points (N, 3)`` (world mm).
    Points whose true location falls outside B's field of view are not counted.
    """
    if len(cases) < 2:
        raise ValueError("evaluation needs at least two subjects")
    rng = np.random.default_rng(seed)
    errors: dict[str, list] = {k: [] for k in methods}
    timings: dict[str, float] = {k: 0.0 for k in methods}
    n_used = 0
    for _ in range(n_pairs):
        ia, ib = rng.choice(len(cases), size=2, replace=False)
        a, b = cases[ia], cases[ib]
        pts = sample_body_points(a.volume, n_points, rng)
        truth = correspond(maps[a.name], maps[b.name], pts)
        keep = inside(b.volume, truth, margin=2.0)
        pts, truth = pts[keep], truth[keep]
        if len(pts) == 0:
            continue
        n_used += len(pts)
        for name, fn in methods.items():
            t0 = time.perf_counter()
            pred = np.asarray(fn(a, b, pts))
            timings[name] += time.perf_counter() - t0
            errors[name].append(np.linalg.norm(pred - truth, axis=1))
    out = {"pairs": n_pairs, "points": n_used, "methods": {}}
    for name, errs in errors.items():
        e = np.concatenate(errs) if errs else np.zeros(0)
        out["methods"][name] = {**summarize(e), "seconds": round(timings[name], 2)} if len(e) else {"n": 0}
    return out


def matcher_method(matcher, consistency: str | None = None, **settings) -> Callable:
    """A method for :func:`evaluate_pairs`; ``consistency`` and ``settings`` (matcher attributes such
    as ``local_radius_mm``) override the matcher's for its calls, so methods share its embeddings."""
    overrides = {**settings, **({} if consistency is None else {"consistency": consistency})}

    def fn(a: Case, b: Case, pts: np.ndarray) -> np.ndarray:
        saved = {k: getattr(matcher, k) for k in overrides}
        for k, v in overrides.items():
            setattr(matcher, k, v)
        try:
            return matcher.match(a.volume, b.volume, pts)[0]
        finally:
            for k, v in saved.items():
                setattr(matcher, k, v)

    return fn


def reference_method(matcher, cases: Sequence[Case]) -> Callable:
    """A method for :func:`evaluate_pairs` with O(N) consistency: every case fitted once to the
    reference case (median body size), a pair's map composed as ``inv(T_B) @ T_A``.

    The N fits run here, up front; ``fn.fit_seconds`` says how long they took.
    """
    t0 = time.perf_counter()
    embs = [matcher.embed(c.volume) for c in cases]
    transforms = reference_transforms(matcher, embs, [(c.body_lo, c.body_hi) for c in cases])
    index = {c.name: k for k, c in enumerate(cases)}

    def fn(a: Case, b: Case, pts: np.ndarray) -> np.ndarray:
        return apply_affine(compose(transforms[index[a.name]], transforms[index[b.name]]), pts)

    fn.fit_seconds = round(time.perf_counter() - t0, 2)
    return fn


def format_table(result: dict) -> str:
    lines = [f"{'method':<22} {'MRE mm':>8} {'median':>8} {'p90':>8} {'<=10mm':>8} {'n':>6}"]
    for name, m in result["methods"].items():
        if not m.get("n"):
            lines.append(f"{name:<22} (no points)")
            continue
        lines.append(f"{name:<22} {m['mre_mm']:8.2f} {m['median_mm']:8.2f} {m['p90_mm']:8.2f} "
                     f"{100 * m['within_10mm']:7.1f}% {m['n']:6d}")
    return "\n".join(lines)


def untrained_network(model_meta: dict, volumes: Sequence, seed: int = 0, crops: int = 4):
    """The model's architecture with random weights; batch-norm statistics measured on ``volumes``.

    Without data statistics a random network's embeddings all point one way (cosine ~1), which
    would make a needlessly weak baseline; with them it is a fair "random features" matcher.
    """
    torch.manual_seed(seed)
    net = build_model(from_dict(ModelConfig, model_meta["model"]))
    rng = np.random.default_rng(seed)
    batches = []
    for v in list(volumes)[:crops]:
        arr, _ = prepare_array(v, model_meta["spacing"], model_meta["hu_window"], net.cfg.extra_windows)
        size = [min(64, s) for s in arr.shape[1:]]
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(arr.shape[1:], size)]
        crop = arr[(slice(None), *[slice(a, a + c) for a, c in zip(start, size)])]
        batches.append(torch.from_numpy(np.ascontiguousarray(crop))[None])
    return recalibrate_norms(net, batches).eval()


# ----------------------------------------------------------------------------- real CT: organ contours


@dataclass
class LabelledCase:
    """A real CT with organ contours: ``label`` on the volume's grid, ``contoured`` the ids it contours."""

    name: str
    volume: object  # alice3d.data.io.Volume (HU)
    label: np.ndarray  # (X, Y, Z) int
    contoured: tuple[int, ...]
    body_lo: np.ndarray
    body_hi: np.ndarray


def load_labelled_cases(entries: Sequence[dict]) -> list[LabelledCase]:
    """Cases of a datalist with labels (``{"image", "label", "contoured"?}``); without ``contoured``
    every label id present in the map counts as contoured."""
    cases = []
    for e in entries:
        vol = load_volume(e["image"], e["label"])
        contoured = tuple(int(c) for c in e.get("contoured", [int(v) for v in np.unique(vol.label) if v > 0]))
        lo, hi = body_box(vol)
        cases.append(LabelledCase(Path(e["image"]).name.split(".")[0], vol, vol.label, contoured, lo, hi))
    return cases


def organ_point(case: LabelledCase, organ: int, on_structure: bool) -> np.ndarray | None:
    """World point of ``organ``: its centroid, or (``on_structure``) the organ voxel nearest to the
    centroid, which lies inside an elongated or curved structure whose centroid may not."""
    ijk = np.argwhere(case.label == organ)
    if not len(ijk):
        return None
    c = ijk.mean(0)
    if on_structure:
        c = ijk[np.argmin(((ijk - c) ** 2).sum(1))].astype(np.float64)
    return case.volume.voxel_to_world(c[None])[0]


def distance_to_structure(case: LabelledCase, organ: int, points: np.ndarray) -> np.ndarray:
    """(N,) world distance (mm) from each point to the nearest voxel of ``organ`` (0 inside it)."""
    mask = case.label == organ
    dist = ndimage.distance_transform_edt(~mask, sampling=case.volume.spacing)
    ijk = np.rint(case.volume.world_to_voxel(points)).astype(int)
    ijk = np.clip(ijk, 0, np.asarray(mask.shape) - 1)
    return dist[tuple(ijk.T)]


def evaluate_organ_pairs(cases: Sequence[LabelledCase], methods: dict[str, Callable], compact: dict[int, str],
                         elongated: dict[int, str], n_pairs: int = 20, seed: int = 0) -> dict:
    """Per organ and method: compact organs by the error of the matched centroid, elongated ones
    (spinal cord, oesophagus) by the distance from the matched point to the structure.

    For each of ``n_pairs`` random ordered pairs (A, B) of different cases, every organ contoured in
    both is queried at its point in A (:func:`organ_point`) and the method's match in B scored.
    ``methods`` as in :func:`evaluate_pairs`.
    """
    if len(cases) < 2:
        raise ValueError("evaluation needs at least two cases")
    rng = np.random.default_rng(seed)
    organs = {**compact, **elongated}
    errors = {m: {o: [] for o in organs} for m in methods}
    pairs = []
    for _ in range(n_pairs):
        ia, ib = (int(i) for i in rng.choice(len(cases), size=2, replace=False))
        a, b = cases[ia], cases[ib]
        shared = [o for o in organs if o in a.contoured and o in b.contoured]
        pts = [organ_point(a, o, on_structure=o in elongated) for o in shared]
        keep = [(o, p) for o, p in zip(shared, pts) if p is not None]
        if not keep:
            continue
        pairs.append((a.name, b.name))
        query = np.stack([p for _, p in keep])
        for name, fn in methods.items():
            pred = np.asarray(fn(a, b, query))
            for (o, _), q in zip(keep, pred):
                if o in elongated:
                    errors[name][o].append(float(distance_to_structure(b, o, q[None])[0]))
                else:
                    truth = organ_point(b, o, on_structure=False)
                    errors[name][o].append(float(np.linalg.norm(q - truth)))
    out = {"pairs": [list(p) for p in pairs], "organs": {str(o): n for o, n in organs.items()},
           "compact": sorted(compact), "elongated": sorted(elongated), "methods": {}}
    for name, per in errors.items():
        res = {organs[o]: summarize(np.asarray(e)) for o, e in per.items() if e}
        comp = np.concatenate([np.asarray(per[o]) for o in compact if per[o]] or [np.zeros(0)])
        if len(comp):
            res["compact organs"] = summarize(comp)
        out["methods"][name] = res
    return out


def format_organ_table(result: dict) -> str:
    """One row per method and organ: MRE, median, within 10 mm, n."""
    lines = [f"{'method':<18} {'organ':<16} {'MRE mm':>8} {'median':>8} {'<=10mm':>8} {'n':>5}"]
    for name, per in result["methods"].items():
        for organ, m in per.items():
            lines.append(f"{name:<18} {organ:<16} {m['mre_mm']:8.2f} {m['median_mm']:8.2f} "
                         f"{100 * m['within_10mm']:7.1f}% {m['n']:5d}")
    return "\n".join(lines)
