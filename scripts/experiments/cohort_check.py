#!/usr/bin/env python
"""Can a cohort reward Alice? True cross-subject crop pairs vs one crop under strong augmentation.

Alice aligns a crop of volume A with the crop of the *same anatomy* in volume B. That teaches
invariance across patients only if two patients' crops of one body part differ more than a
crop differs from its own strongly augmented view (the target branch's views): otherwise the
cross-volume term asks for nothing the augmentation did not already ask for.

For random pairs (A, B) of subjects this measures, on windowed crops (HU [-125, 255] -> [0, 1],
64x64x32 voxels at 3 mm), the Pearson correlation of the voxel intensities of
  cross    the crop at a point of A and the crop at the true corresponding point of B
           (phantoms: the exact subject maps; OpenKBP: the same organ's centroid),
  augment  the crop of A and its strong augmentation (Alice's target view: rotation up to
           15 degrees per plane, zoom 0.9-1.2, flips, intensity scale/shift 0.1),
  random   the crop of A and a crop at a random body point of B (unrelated anatomy),
and writes OUT/cohort_check.{json,md} with means and 95 % bootstrap intervals.

    python scripts/experiments/cohort_check.py --out docs/results                       # phantoms + OpenKBP
    python scripts/experiments/cohort_check.py --out OUT --openkbp data/openkbp/dataset.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from alice3d.data.canonical import to_canonical
from alice3d.data.datalists import load_datalist
from alice3d.data.io import load_volume
from alice3d.data.phantom import correspond, default_cohort, load_cohort_maps
from alice3d.data.sources import crop_at
from alice3d.data.volumes import normalize_hu
from alice3d.methods.views import StrongAugConfig, strong_augment

CROP = (64, 64, 32)
SPACING = (3.0, 3.0, 3.0)
WINDOW = (-125.0, 255.0)
BODY_HU = -500.0


def prepared(path: str, label: str | None = None):
    """The volume (and label) in RAS at SPACING mm, through the commands' one geometry path, and its windowed array."""
    vol = to_canonical(load_volume(path, label), SPACING)
    return vol, normalize_hu(vol.array, WINDOW)


def crop_world(vol, arr: np.ndarray, point: np.ndarray) -> np.ndarray:
    centre = np.rint(vol.world_to_voxel(point[None])[0]).astype(int)
    return crop_at(arr, centre, CROP, 0.0)


def body_point(vol, rng: np.random.Generator) -> np.ndarray:
    idx = np.argwhere(vol.array > BODY_HU)
    return vol.voxel_to_world(idx[rng.integers(len(idx))][None].astype(float))[0]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def augmented(crop: np.ndarray, seed: int) -> np.ndarray:
    x = torch.from_numpy(crop)[None, None]
    return strong_augment(x, StrongAugConfig(), torch.Generator().manual_seed(seed))[0, 0].numpy()


def measure(draws) -> dict:
    """``draws``: iterable of (crop A, crop at the true match in B, crop at a random point of B, seed)."""
    out = {"cross": [], "augment": [], "random": []}
    for qa, qb, rb, seed in draws:
        out["cross"].append(pearson(qa, qb))
        out["augment"].append(pearson(qa, augmented(qa, seed)))
        out["random"].append(pearson(qa, rb))
    return out


def summary(values: dict, rng: np.random.Generator, n_boot: int = 10000) -> dict:
    res = {}
    for k, v in values.items():
        v = np.asarray(v)
        boots = v[rng.integers(len(v), size=(n_boot, len(v)))].mean(1)
        res[k] = {"mean": float(v.mean()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                  "n": int(len(v))}
    d = np.asarray(values["cross"]) - np.asarray(values["augment"])
    boots = d[rng.integers(len(d), size=(n_boot, len(d)))].mean(1)
    res["cross_minus_augment"] = {"mean": float(d.mean()), "ci95": [float(np.percentile(boots, 2.5)),
                                                                    float(np.percentile(boots, 97.5))]}
    return res


def phantom_draws(n_pairs: int, rng: np.random.Generator):
    root = default_cohort(n=16, seed=0)
    maps = load_cohort_maps(root)
    names = sorted(maps)
    vols = {n: prepared(str(root / maps[n].meta.get("image", f"imagesTr/{n}.nii.gz"))) for n in names}
    for i in range(n_pairs):
        a, b = rng.choice(len(names), size=2, replace=False)
        (va, xa), (vb, xb) = vols[names[a]], vols[names[b]]
        p = body_point(va, rng)
        pb = correspond(maps[names[a]], maps[names[b]], p[None])[0]
        yield crop_world(va, xa, p), crop_world(vb, xb, pb), crop_world(vb, xb, body_point(vb, rng)), i


def organ_centroid(vol, organ: int) -> np.ndarray | None:
    idx = np.argwhere(vol.label == organ)
    return vol.voxel_to_world(idx.mean(0)[None])[0] if len(idx) else None


def openkbp_draws(datalist: Path, split: str, n_pairs: int, rng: np.random.Generator, max_cases: int = 24):
    entries = load_datalist(datalist, key=split)[:max_cases]
    cases = [(e, *prepared(e["image"], e["label"])) for e in entries]
    compact = (1, 3, 4, 6, 7)  # brainstem, parotids, larynx, mandible: centroids are landmarks
    for i in range(n_pairs):
        a, b = rng.choice(len(cases), size=2, replace=False)
        (ea, va, xa), (eb, vb, xb) = cases[a], cases[b]
        shared = [o for o in compact if o in ea.get("contoured", compact) and o in eb.get("contoured", compact)]
        if not shared:
            continue
        organ = int(rng.choice(shared))
        pa, pb = organ_centroid(va, organ), organ_centroid(vb, organ)
        if pa is None or pb is None:
            continue
        yield crop_world(va, xa, pa), crop_world(vb, xb, pb), crop_world(vb, xb, body_point(vb, rng)), i


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--openkbp", type=Path, default=None, help="dataset.json of `alice3d-data import openkbp`")
    p.add_argument("--split", default="test", help="OpenKBP split to draw patients from")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {"crop": list(CROP), "spacing_mm": list(SPACING), "hu_window": list(WINDOW), "pairs": args.pairs,
               "augmentation": vars(StrongAugConfig()), "cohorts": {}}
    cohorts = {"phantoms (embedded default, 16 subjects)": phantom_draws(args.pairs, np.random.default_rng(args.seed))}
    if args.openkbp is not None:
        cohorts[f"OpenKBP ({args.split} patients)"] = openkbp_draws(args.openkbp, args.split, args.pairs,
                                                                     np.random.default_rng(args.seed))
    for name, draws in cohorts.items():
        results["cohorts"][name] = summary(measure(draws), np.random.default_rng(args.seed))
        print(name, json.dumps(results["cohorts"][name]), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cohort_check.json").write_text(json.dumps(results, indent=1))
    lines = ["# Cohort check: true cross-subject pairs vs strong augmentation", "",
             "Pearson correlation of windowed crop intensities (64x64x32 at 3 mm), mean [95 % bootstrap interval]; "
             "written by `scripts/experiments/cohort_check.py`.", "",
             "| cohort | cross-subject pair | crop vs its strong augmentation | random crop of B | cross - augment |",
             "|---|---|---|---|---|"]
    for name, r in results["cohorts"].items():
        cell = lambda k: f"{r[k]['mean']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]"  # noqa: E731
        lines.append(f"| {name} (n={r['cross']['n']}) | {cell('cross')} | {cell('augment')} | {cell('random')} | "
                     f"{cell('cross_minus_augment')} |")
    lines += ["", "A cross-subject pair that correlates *more* than a crop with its own augmented view means the "
              "cohort's subjects differ less than the augmentation does: Alice's cross-volume term then asks for no "
              "invariance the target views did not already ask for."]
    (args.out / "cohort_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
