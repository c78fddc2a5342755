"""alice3d-data: synthetic phantom cohorts, PNG previews and data validation.

    alice3d-data phantoms --out DIR [--n N] [--seed S] [--size small|btcv|tiny] [--preview]
    alice3d-data preview  --image IMG [--label LBL] --out PNG [--point x,y,z] [--window lo,hi]
    alice3d-data validate DATALIST_OR_DIR [--key training] [--full] [--labels 0-13] [--modality CT|MR] [--json F]
    alice3d-data preprocess --data DATALIST_OR_DIR --out STORE [--spacing X,Y,Z] [--hu-window LO,HI]
                            [--hu-offset HU] [--workers N] [--shard I/N] [--verify]
    alice3d-data import openkbp --src DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..cli.args import attach_negative_values
from ..cli.common import setup_logging
from ..data.datalists import display_names, load_datalist
from ..data.importers.openkbp import import_openkbp
from ..data.inspect import SAMPLE_SLICES
from ..data.io import DataError, load_volume
from ..data.phantom import SIZES, generate_cohort
from ..data.preprocess import build_store, env_shard, parse_shard
from ..data.store import StoreSettings, body_hu_of_window
from ..data.validate import inspect_datalist
from ..errors import Alice3DError
from ..pretrain.config import PretrainConfig
from ..viz.ortho import save_preview


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


# Options whose values are numbers, so may start with a minus (RAS world coordinates, HU windows):
# `main` attaches such values (`--window -1000,400` -> `--window=-1000,400`) before argparse sees them.
NUMERIC_OPTIONS = frozenset({"--point", "--window", "--spacing", "--hu-window", "--hu-offset"})


def build_parser() -> argparse.ArgumentParser:
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
                    help="world point x,y,z (RAS mm) to slice through and mark (default: volume centre); a leading "
                         'minus is fine: --point "-97.8,-129.1,136.5"')
    pv.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), default=(-175.0, 250.0),
                    help="intensity window lo,hi (default -175,250 HU), e.g. --window -1000,400")
    pv.add_argument("--size", type=int, default=320, help="longest panel side in pixels")

    va = sub.add_parser("validate", help="check every case of a datalist or image folder; exit 1 if any is bad",
                        description="Check every case and print what was read: shape, spacing, orientation, "
                                    "intensity range and median, and the modality the image looks like; warn when "
                                    "an image looks like a label map, like MR where CT is expected or like a CT "
                                    "stored with a +1024 offset (modality CT+1024), when a CT holds metal (voxels "
                                    "above 3,000 HU) and when it has too few slices for a 3-D volume. Exit 0: all "
                                    "usable (warnings allowed), 1: bad cases (all listed), 2: the datalist itself "
                                    "cannot be read.")
    va.add_argument("data", type=Path, help="datalist JSON (Decathlon/BTCV), folder of images, or one image file")
    va.add_argument("--key", action="append", default=None, help="datalist split(s) to check (default: training, validation)")
    va.add_argument("--full", action="store_true",
                    help="read all voxels (NaN/inf, constant images, label values) and compute the intensity "
                         "statistics from every voxel; without it only headers are checked and the statistics "
                         f"come from a subsample ({SAMPLE_SLICES} evenly spaced slices; .mha/.nrrd are read whole)")
    va.add_argument("--labels", type=_label_set, default=None,
                    help="allowed label ids, e.g. 0-13 (default: the datalist's 'labels' header, if any)")
    va.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None,
                    help="modality the images should be (default: the datalist's 'modality' header, else CT)")
    va.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write every case (its statistics, warnings, or the reasons it is bad) to FILE as JSON; "
                         "when the datalist itself cannot be read (exit 2) FILE holds the error (and the cases of "
                         "splits read before it, if any)")

    default = PretrainConfig().data
    pp = sub.add_parser("preprocess", help="preprocess a cohort once into a volume store read crop by crop",
                        description="Check every case (the validate checks; bad cases are listed with their reasons "
                                    "and left out), reorient to RAS, resample, and store each volume as int16 HU with "
                                    "its body mask in a chunked, compressed, checksummed zarr store with a manifest. "
                                    "Resumable: run it again after a kill and it continues. Under torchrun (or with "
                                    "--shard) each process does its share; whichever finds every case done writes "
                                    "STORE/manifest.json.")
    pp.add_argument("--data", required=True, type=Path, help="datalist JSON (Decathlon/BTCV) or folder of images")
    pp.add_argument("--out", required=True, type=Path, help="the store folder (created, or resumed)")
    pp.add_argument("--key", action="append", default=None, help="datalist split(s) to include (default: training)")
    pp.add_argument("--spacing", type=lambda s: _floats(s, 3, "--spacing"), default=tuple(default.spacing),
                    help=f"voxel spacing in mm, x,y,z (default {','.join(f'{v:g}' for v in default.spacing)}: the "
                         "alice3d-pretrain default; a run with another data.spacing refuses the store)")
    pp.add_argument("--hu-window", type=lambda s: _floats(s, 2, "--hu-window"), default=tuple(default.hu_window),
                    help=f"HU window of the runs the store is for (default {default.hu_window[0]:g},"
                         f"{default.hu_window[1]:g}); only its 5%% level is used, as the body threshold for crop "
                         "centres: the store keeps HU and runs apply their own data.hu_window when reading")
    pp.add_argument("--workers", type=int, default=None, help="parallel processes (default: automatic)")
    pp.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                    help="do only the cases k with k %% N == I (several nodes into one store on a shared "
                         "filesystem); default under torchrun: RANK/WORLD_SIZE")
    pp.add_argument("--hu-offset", type=float, default=float(default.hu_offset), metavar="HU",
                    help="added to every intensity right after reading (default 0): -1024 for a CT stored as "
                         "HU + 1024 (air at 0, e.g. OpenKBP); part of the store's settings, so runs reading the "
                         "store must set the same data.hu_offset")
    pp.add_argument("--verify", action="store_true",
                    help="also read back every case already in the store and rebuild those whose checksums fail")

    im = sub.add_parser("import", help="convert a public dataset from its own format to NIfTI + a datalist",
                        description="openkbp: the OpenKBP head-and-neck planning CTs (sparse CSVs) -> OUT/imagesTr "
                                    "(NIfTI in HU, outside the body contour -1024), OUT/labelsTr (the 7 organs at risk: "
                                    "1 Brainstem, 2 SpinalCord, 3 RightParotid, 4 LeftParotid, 5 Esophagus, 6 Larynx, "
                                    "7 Mandible) and OUT/dataset.json (the challenge's train/validation/test split as "
                                    "training/validation/test; each entry lists the labels its case contours in "
                                    "'contoured': the others are unknown, not background). Patients without ct.csv, "
                                    "or whose contours contradict the axes, are listed and skipped. Resumable.")
    im.add_argument("dataset", choices=["openkbp"], help="which dataset")
    im.add_argument("--src", required=True, type=Path,
                    help="a clone of the open-kbp repository, or its provided-data/ folder")
    im.add_argument("--out", required=True, type=Path, help="output folder (created, or resumed)")
    return p


def _cmd_import(args) -> int:
    r = import_openkbp(args.src, args.out, progress=True)
    for patient, reason in r.skipped:
        print(f"SKIP {patient}: {reason}")
    print(f"imported {r.imported} patient(s) into {args.out} ({sum(r.cases.values()) - r.imported} already there); "
          f"{', '.join(f'{k} {v}' for k, v in r.cases.items())}; {len(r.skipped)} skipped; wrote {r.datalist}")
    return 0


def _cmd_preprocess(args) -> int:
    paths = []
    for key in args.key or ["training"]:
        paths += [str(e["image"]) if isinstance(e, dict) else str(e)
                  for e in load_datalist(args.data, key=key, check_exists=False)]
    shard = args.shard or env_shard()
    # under torchrun every process is one worker already
    workers = args.workers if args.workers is not None or args.shard or not shard else 1
    settings = StoreSettings(tuple(args.spacing), body_hu_of_window(args.hu_window), float(args.hu_offset))
    r = build_store(paths, args.out, settings, workers=workers, shard=shard, verify=args.verify)
    shown = dict(zip((os.path.abspath(p) for p in paths), display_names(paths)))
    for source, at in r.duplicates:
        print(f"WARN {source} is listed {len(at)} times (entries {', '.join(map(str, at))} of {len(paths)}); "
              "stored once")
    for source, reason in r.bad:
        print(f"BAD  {shown.get(os.path.abspath(source), Path(source).name)}: {reason}")
    if args.verify:
        if not r.damaged:
            print(f"verified {r.verified} case(s) already in the store: all read back intact")
        else:
            print(f"verified {r.verified} case(s) already in the store: {r.damaged} damaged, {r.rebuilt} rebuilt"
                  + ("" if r.rebuilt == r.damaged else " (the others are listed as bad above)"))
    part = f" (shard {shard[0]}/{shard[1]}: {r.mine} of {r.cases} cases)" if shard else ""
    per = f", {r.seconds / r.done_now:.2f} s per case" if r.done_now else ""
    print(f"preprocessed {r.done_now} case(s) into {r.root}{part} in {r.seconds:.1f} s{per}; "
          f"{r.skipped} already done, {len(r.bad)} bad ({settings.describe()})")
    if r.manifest is None:
        print(f"other cases are not done yet: {r.root}/manifest.json is written by the run that finishes the "
              "last case (or run this command again without --shard)")
    else:
        doc = json.loads(r.manifest.read_text())["totals"]
        print(f"store complete: {doc['cases']} cases, {doc['bad']} bad, {doc['store_bytes'] / 1e6:.1f} MB "
              f"({doc['source_bytes'] / 1e6:.1f} MB of sources); wrote {r.manifest}")
    return 0


def _cmd_phantoms(args) -> int:
    t0 = time.time()
    out = generate_cohort(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers,
                          preview=args.preview, progress=sys.stderr.isatty())
    print(f"wrote {args.n} {args.size} phantom subjects to {out} in {time.time() - t0:.1f} s "
          f"(dataset_0.json, phantom_maps.json{', previews/' if args.preview else ''})")
    return 0


def _cmd_preview(args) -> int:
    try:
        vol = load_volume(args.image, args.label)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        save_preview(args.out, vol, point_world=args.point, window=args.window, max_px=args.size)
    except ValueError as e:  # the viewer's own argument checks (e.g. a --size too small for the panels)
        print(f"error: cannot draw {args.image}: {e} (--size sets max_px)", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _datalist_header(path: Path) -> dict:
    """The datalist JSON's top-level object ({} for a plain folder or an unreadable file)."""
    f = path
    if path.is_dir():
        f = next((path / n for n in ("dataset_0.json", "dataset.json") if (path / n).is_file()), None)
    if f is None or f.suffix != ".json":
        return {}
    try:
        doc = json.loads(f.read_text())
    except (ValueError, OSError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _header_labels(path: Path) -> list[int] | None:
    labels = _datalist_header(path).get("labels")
    try:
        return sorted(int(k) for k in labels) if isinstance(labels, dict) else None
    except ValueError:
        return None


def _header_modality(path: Path) -> str:
    """MR when the Decathlon 'modality' header's first channel is an MR contrast ({"0": "T2"}), else CT."""
    modality = _datalist_header(path).get("modality")
    name = str(modality.get("0", "CT")).upper() if isinstance(modality, dict) else "CT"
    return "MR" if name.startswith(("MR", "T1", "T2", "FLAIR", "ADC", "DWI")) else "CT"


def _print_reports(key: str, reports, names: dict[str, str] | None = None) -> None:
    """ok lines (with what was read), then warnings, then bad cases: the problems end up last.

    ``names``: absolute image path -> the name to show (:func:`display_names` over every listed
    image, so that ``patient1/PATIENT_DICOM`` and ``patient2/PATIENT_DICOM`` read apart)."""
    def shown(image) -> str:
        return (names or {}).get(os.path.abspath(str(image))) or Path(image).name

    for r in reports:
        if r.ok:
            print(f"ok   {key}: {shown(r.image)}: {r.stats.summary() if r.stats else ''}")
    for r in reports:
        for w in r.warnings:
            print(f"WARN {key}: {w}")
    for r in reports:
        if not r.ok:
            print(f"BAD  {key}: {shown(r.image)}: {'; '.join(r.problems)}")


def _write_validate_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(f"wrote {path}")


def _cmd_validate(args) -> int:
    keys = args.key or ["training", "validation"]
    if not args.data.is_dir() and args.data.suffix.lower() != ".json":
        keys = keys[:1]  # one image file is the same one case under every split: list it once
    labels = args.labels if args.labels is not None else _header_labels(args.data)
    modality = args.modality or _header_modality(args.data)
    cases = []
    # every list first, so that each image is named apart from all the others listed (any split)
    listed: dict[str, list | DataError] = {}
    for key in keys:
        try:
            # a listed file that is missing is one more bad case, not the end of the check
            listed[key] = load_datalist(args.data, key=key, check_exists=False)
        except DataError as e:
            listed[key] = e  # reported below, once the lists before it are checked
    images = [str(e["image"]) for entries in listed.values() if not isinstance(entries, DataError)
              for e in entries if isinstance(e, dict) and e.get("image") is not None]
    names = dict(zip((os.path.abspath(p) for p in images), display_names(images, keep_suffix=True)))
    for key in keys:
        entries = listed.get(key)
        if isinstance(entries, DataError):
            e = entries
            if args.key is None and key != "training" and "no 'validation' list" in str(e):
                continue
            print(f"error: {e}", file=sys.stderr)
            if args.json is not None:  # whoever reads the report learns why there are no cases
                _write_validate_json(args.json, {"data": str(args.data), "error": str(e), "split": key,
                                                 "expected_modality": modality, "labels": labels, "cases": cases})
            return 2
        reports = inspect_datalist(entries, label_values=labels, full=args.full, describe=True,
                                   expect_modality=modality)
        _print_reports(key, reports, names)
        cases += [{"split": key, **r.to_dict()} for r in reports]
    n_bad = sum(c["status"] == "bad" for c in cases)
    n_warn = sum(len(c["warnings"]) for c in cases)
    stats = "all voxels" if args.full else f"a subsample of {SAMPLE_SLICES} slices"
    print(f"{len(cases) - n_bad} good, {n_bad} bad, {n_warn} warning(s) "
          f"({'full read' if args.full else 'header checks'}, intensities from {stats}, expected {modality}"
          f"{', labels ' + str(labels[0]) + '..' + str(labels[-1]) if labels else ''})")
    if args.json is not None:
        doc = {"data": str(args.data), "read": "full" if args.full else "header", "intensity_stats_from": stats,
               "expected_modality": modality, "labels": labels, "good": len(cases) - n_bad, "bad": n_bad,
               "warnings": n_warn, "cases": cases}
        _write_validate_json(args.json, doc)
    return 1 if n_bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(attach_negative_values(argv, NUMERIC_OPTIONS))
    handler = {"phantoms": _cmd_phantoms, "preview": _cmd_preview, "validate": _cmd_validate,
               "preprocess": _cmd_preprocess, "import": _cmd_import}[args.command]
    if args.command in ("preprocess", "import"):
        setup_logging(False)
        try:
            return handler(args)
        except Alice3DError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
