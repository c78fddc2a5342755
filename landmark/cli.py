"""``alice3d-landmark``: train the landmark matcher, match points, pre-compute embeddings.

    alice3d-landmark train --out RUN [--data DATALIST_OR_DIR] [--config FILE] [--resume] [key=value ...]
    alice3d-landmark match --model RUN/landmark.pt --source A --target B --points "x,y,z;..." [--png F]
    alice3d-landmark embed --model RUN/landmark.pt IMAGE [IMAGE ...]

Points are world coordinates in millimetres (RAS+, as in NIfTI/nibabel). ``match``
prints one JSON line per point: {"query": [x, y, z], "match": [x, y, z], "score": s}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger("alice3d.landmark")


def build_parser() -> argparse.ArgumentParser:
    from alice3d.cli.common import add_config_args
    from landmark.config import LandmarkConfig

    p = argparse.ArgumentParser(prog="alice3d-landmark",
                                description="Self-supervised anatomical landmark matcher (SAM-style).")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a landmark model on unlabeled volumes",
                        description="Self-supervised training from unlabeled volumes. Without --data: the embedded "
                                    "phantom cohort and a CPU-sized model (a few minutes). Writes RUN/config.yaml, "
                                    "RUN/metrics.jsonl, RUN/checkpoints/last.pt and RUN/landmark.pt.")
    tr.add_argument("--out", required=True, type=Path, help="run directory")
    tr.add_argument("--data", default=None, help="datalist JSON or image folder (default: phantom cohort)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_args(tr, LandmarkConfig)

    def matcher_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, type=Path, help="landmark model file (RUN/landmark.pt)")
        sp.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache (default $ALICE3D_CACHE/embeddings or ~/.cache/alice3d/embeddings)")
        sp.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    mt = sub.add_parser("match", help="find points of volume A in volume B",
                        description="Prints one JSON line per point: query and match in world mm (RAS), score.")
    matcher_args(mt)
    mt.add_argument("--source", required=True, type=Path, help="volume A (NIfTI, .mha, .nrrd, DICOM folder)")
    mt.add_argument("--target", required=True, type=Path, help="volume B")
    mt.add_argument("--points", required=True, help='world points in A (mm): "x,y,z;x,y,z;..."')
    mt.add_argument("--consistency", choices=["affine", "none"], default=None,
                    help="affine (default): map the points through an affine fitted to round-trip-consistent "
                         "anchor matches of the two volumes (much more accurate, ~2 s extra per volume pair on "
                         "CPU); none: each point's best-matching voxel on its own")
    mt.add_argument("--png", type=Path, default=None,
                    help="write orthogonal slices: query on A (top row), match on B (bottom row); "
                         "with several points, one row pair per point")

    em = sub.add_parser("embed", help="compute and cache the embeddings of volumes")
    matcher_args(em)
    em.add_argument("images", nargs="+", type=Path, help="volumes to embed")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from alice3d.cli.common import prepare_run_dir, resolve_config
    from landmark.config import LandmarkConfig
    from landmark.train import load_train_volumes, train_landmark

    extra = [f"data.data={args.data}"] if args.data is not None else []
    cfg = resolve_config(LandmarkConfig, args, extra)
    out = prepare_run_dir(args.out, args.resume)
    bad: list = []
    volumes = load_train_volumes(cfg, bad)
    path = train_landmark(cfg, volumes, out, resume=args.resume)
    if path is None:
        return 3  # interrupted: checkpoint saved, the warning says how to continue
    if bad:
        log.warning("%d bad volume(s) were left out of this run (data.on_bad_data=skip):\n  %s",
                    len(bad), "\n  ".join(f"{p}: {r}" for p, r in bad))
    print(json.dumps({"model": str(path)}))
    return 0


def _matcher(args: argparse.Namespace):
    from landmark.match import Matcher

    return Matcher(args.model, cache_dir=args.cache_dir, device=args.device, use_cache=not args.no_cache,
                   consistency=getattr(args, "consistency", None))


def cmd_match(args: argparse.Namespace) -> int:
    from alice3d.data.io import load_volume
    from landmark.match import parse_points

    points = parse_points(args.points)
    matcher = _matcher(args)
    src, dst = load_volume(args.source), load_volume(args.target)
    found, scores = matcher.match(src, dst, points)
    for q, m, s in zip(points, found, scores):
        print(json.dumps({"query": [round(float(v), 3) for v in q], "match": [round(float(v), 3) for v in m],
                          "score": round(float(s), 5)}))
    if args.png is not None:
        write_match_png(args.png, src, dst, points, found, scores)
        log.info("wrote %s", args.png)
    return 0


def write_match_png(path: Path, src, dst, points, found, scores) -> Path:
    """Rows of ortho slices: query on A, then its match on B, for each point (at most 8)."""
    from alice3d.analysis.png import write_png
    from alice3d.analysis.previews import mosaic, ortho_slices

    rows = []
    for q, m in list(zip(points, found))[:8]:
        rows.append([ortho_slices(src.array, affine=src.affine, point_world=q, window=(-400.0, 400.0))])
        rows.append([ortho_slices(dst.array, affine=dst.affine, point_world=m, window=(-400.0, 400.0))])
    return write_png(path, mosaic(rows))


def cmd_embed(args: argparse.Namespace) -> int:
    import time

    matcher = _matcher(args)
    for image in args.images:
        t0 = time.perf_counter()
        emb = matcher.embed(image)
        print(json.dumps({"image": str(image), "fine_shape": list(emb.fine_shape),
                          "cache": str(matcher.cache_path(emb.key)) if matcher.use_cache else None,
                          "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    from alice3d.cli.common import run_main, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    commands = {"train": cmd_train, "match": cmd_match, "embed": cmd_embed}

    def body() -> int:
        from alice3d.data.io import DataError
        from landmark.embed_cache import CacheError
        from landmark.match import MatchError
        from landmark.pairs import PairError

        try:
            return commands[args.command](args)
        except (MatchError, CacheError, PairError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run_main(body)


if __name__ == "__main__":
    main()
