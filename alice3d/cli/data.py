"""alice3d-data: synthetic phantom cohorts, PNG previews and data validation.

    alice3d-data phantoms --out DIR [--n N] [--seed S] [--size small|btcv|tiny] [--preview]
    alice3d-data preview  --image IMG [--label LBL] --out PNG [--point x,y,z] [--window lo,hi]
    alice3d-data validate DATALIST_OR_DIR [--key training] [--full] [--labels 0-13]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def _label_set(text: str) -> list[int]:
    """'0-13' or '0,1,2,6' -> sorted label ids."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels: expected ids like '0-13' or '0,1,6', got {text!r}") from None
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    from ..data.phantom_render import SIZES

    p = argparse.ArgumentParser(prog="alice3d-data", description="Synthetic CT phantoms, previews and data checks.")
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantoms", help="generate a synthetic abdominal CT cohort (BTCV layout)",
                        description="Write DIR/imagesTr, DIR/labelsTr, DIR/dataset_0.json and DIR/phantom_maps.json "
                                    "(ground-truth correspondence between subjects).")
    ph.add_argument("--out", required=True, type=Path, help="output directory")
    ph.add_argument("--n", type=int, default=30, help="number of subjects (default 30: 24 training + 6 validation)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (same seed = identical cohort)")
    ph.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="small: ~128x128 voxels of ~3 mm (CPU-friendly); btcv: 512x512 at 0.6-0.95 mm, 80-200 slices")
    ph.add_argument("--workers", type=int, default=None, help="parallel processes (default: automatic)")
    ph.add_argument("--preview", action="store_true", help="also write DIR/previews/<case>.png")

    pv = sub.add_parser("preview", help="write a PNG of axial/coronal/sagittal slices with a label overlay")
    pv.add_argument("--image", required=True, type=Path, help="image file (NIfTI, .mha, .nrrd) or DICOM folder")
    pv.add_argument("--label", type=Path, default=None, help="label map to overlay")
    pv.add_argument("--out", required=True, type=Path, help="output PNG")
    pv.add_argument("--point", type=lambda s: _floats(s, 3, "--point"), default=None,
                    help="world point x,y,z (RAS mm) to slice through and mark (default: volume centre)")
    pv.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), default=(-175.0, 250.0),
                    help="intensity window lo,hi (default -175,250 HU)")
    pv.add_argument("--size", type=int, default=320, help="longest panel side in pixels")

    va = sub.add_parser("validate", help="check every case of a datalist or image folder; exit 1 if any is bad")
    va.add_argument("data", type=Path, help="datalist JSON (Decathlon/BTCV) or folder of images")
    va.add_argument("--key", action="append", default=None, help="datalist split(s) to check (default: training, validation)")
    va.add_argument("--full", action="store_true", help="read all voxels (NaN/inf, constant images, label values)")
    va.add_argument("--labels", type=_label_set, default=None,
                    help="allowed label ids, e.g. 0-13 (default: the datalist's 'labels' header, if any)")
    return p


def _cmd_phantoms(args) -> int:
    from ..data.phantom import generate_cohort

    t0 = time.time()
    out = generate_cohort(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers,
                          preview=args.preview, progress=sys.stderr.isatty())
    print(f"wrote {args.n} {args.size} phantom subjects to {out} in {time.time() - t0:.1f} s "
          f"(dataset_0.json, phantom_maps.json{', previews/' if args.preview else ''})")
    return 0


def _cmd_preview(args) -> int:
    from ..analysis.previews import save_preview
    from ..data.io import DataError, load_volume

    try:
        vol = load_volume(args.image, args.label)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_preview(args.out, vol, point_world=args.point, window=args.window, max_px=args.size)
    print(f"wrote {args.out}")
    return 0


def _header_labels(path: Path) -> list[int] | None:
    f = path
    if path.is_dir():
        f = next((path / n for n in ("dataset_0.json", "dataset.json") if (path / n).is_file()), None)
    if f is None or f.suffix != ".json":
        return None
    try:
        labels = json.loads(f.read_text()).get("labels")
        return sorted(int(k) for k in labels) if isinstance(labels, dict) else None
    except (ValueError, OSError):
        return None


def _cmd_validate(args) -> int:
    from ..data.datalists import load_datalist
    from ..data.io import DataError
    from ..data.validate import validate_datalist

    keys = args.key or ["training", "validation"]
    labels = args.labels if args.labels is not None else _header_labels(args.data)
    n_good = n_bad = 0
    for key in keys:
        try:
            entries = load_datalist(args.data, key=key)
        except DataError as e:
            if args.key is None and key != "training" and "no 'validation' list" in str(e):
                continue
            print(f"error: {e}", file=sys.stderr)
            return 2
        good, bad = validate_datalist(entries, label_values=labels, full=args.full)
        for e in good:
            print(f"ok   {key}: {Path(e['image']).name}")
        for path, reason in bad:
            print(f"BAD  {key}: {Path(path).name}: {reason}")
        n_good += len(good)
        n_bad += len(bad)
    print(f"{n_good} good, {n_bad} bad ({'full read' if args.full else 'header checks'}"
          f"{', labels ' + str(labels[0]) + '..' + str(labels[-1]) if labels else ''})")
    return 1 if n_bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"phantoms": _cmd_phantoms, "preview": _cmd_preview, "validate": _cmd_validate}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
