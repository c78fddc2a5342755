"""``alice3d-landmark``: train the landmark matcher, match points, pre-compute embeddings.

    alice3d-landmark train --out RUN [--data DATALIST_OR_DIR] [--config FILE] [--resume] [key=value ...]
    alice3d-landmark match --model RUN/landmark.pt --source A --target B
        (--points "x,y,z;..." | --points-file F) [--png F]
    alice3d-landmark embed --model RUN/landmark.pt IMAGE [IMAGE ...]
    alice3d-landmark embed --model RUN/landmark.pt --data STORE [--shard I/N] [--device cuda]
    alice3d-landmark cache (--info | --clear) [--cache-dir DIR]
    python -m alice3d.cli.landmark ...                     (the same)
    torchrun --nproc_per_node N -m alice3d.cli.landmark embed --model RUN/landmark.pt --data STORE

Points are world coordinates in millimetres (RAS+, as in NIfTI/nibabel). ``match``
prints one JSON line per point: {"query": [x, y, z], "match": [x, y, z], "score": s}.
``embed --data STORE`` is the pair preparation of :mod:`landmark.prepare` for a whole store
(embeddings and reference fits; under torchrun each process does its share and waits for the
others at the end), the same step ``alice3d-pretrain`` runs before it builds its dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from alice3d.cli.common import add_config_args, prepare_run_dir, resolve_config, run_main, setup_logging
from alice3d.core.dist import init_distributed, is_dist, is_main_process
from alice3d.data.io import load_volume
from alice3d.data.preprocess import env_shard, parse_shard
from alice3d.data.store import open_store
from alice3d.viz.mosaic import mosaic
from alice3d.viz.ortho import ortho_slices
from alice3d.viz.png import write_png
from landmark.cohort import store_reference
from landmark.config import LandmarkConfig
from landmark.embed_cache import (
    GROUP_SUFFIX,
    MAX_GB_ENV,
    cache_info,
    cache_max_bytes,
    clear_cache,
    default_cache_dir,
    entry_bytes,
)
from landmark.match import Matcher, MatchError, check_points_inside, parse_points, read_points_file
from landmark.prepare import PREPARE_TIMEOUT_S, prepare_store
from landmark.train import load_train_volumes, train_landmark

log = logging.getLogger("alice3d.landmark")


def build_parser() -> argparse.ArgumentParser:
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
    where = mt.add_mutually_exclusive_group(required=True)
    where.add_argument("--points", help='world points in A (mm): "x,y,z;x,y,z;..." (a leading minus is fine: '
                                        '--points "-10,150,120")')
    where.add_argument("--points-file", type=Path, default=None,
                       help='file of world points in A (mm): JSON [[x, y, z], ...] or {"points": [...]}, '
                            'or text with one "x,y,z" per line')
    mt.add_argument("--consistency", choices=["affine", "none"], default=None,
                    help="affine (default): map the points through an affine fitted to round-trip-consistent "
                         "anchor matches of the two volumes (much more accurate, ~2 s extra per volume pair on "
                         "CPU); none: each point's best-matching voxel on its own")
    mt.add_argument("--png", type=Path, default=None,
                    help="write orthogonal slices: query on A (top row), match on B (bottom row); "
                         "with several points, one row pair per point")

    em = sub.add_parser("embed", help="compute and cache the embeddings of volumes (or of a whole volume store)",
                        description="With IMAGEs: embed them into the embedding cache. With --data STORE (from "
                                    "`alice3d-data preprocess`): embed every case into the store and fit each once "
                                    "to the store's reference volume (what pairs.consistency=reference trains "
                                    "with); under torchrun (or with --shard) each process does its share, no "
                                    "volume twice. Resumable: done cases are skipped.")
    matcher_args(em)
    em.add_argument("images", nargs="*", type=Path, help="volumes to embed")
    em.add_argument("--data", type=Path, default=None, help="a volume store to embed (instead of IMAGEs)")
    em.add_argument("--shard", default=None, metavar="I/N",
                    help="with --data: only the cases k with k %% N == I (default under torchrun: RANK/WORLD_SIZE)")

    ca = sub.add_parser("cache", help="show or clear the embedding cache",
                        description="The cache keeps at most $ALICE3D_CACHE_MAX_GB GB (default 20; 0 or 'none': "
                                    "no cap); the least recently used entries are removed first.")
    ca.add_argument("--cache-dir", type=Path, default=None,
                    help="embedding cache (default $ALICE3D_CACHE/embeddings or ~/.cache/alice3d/embeddings)")
    what = ca.add_mutually_exclusive_group(required=True)
    what.add_argument("--info", action="store_true", help="directory, entries, total size, cap, oldest and newest")
    what.add_argument("--clear", action="store_true", help="delete every cache entry (other files are kept)")
    ca.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def cmd_train(args: argparse.Namespace) -> int:
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
    return Matcher(args.model, cache_dir=args.cache_dir, device=args.device, use_cache=not args.no_cache,
                   consistency=getattr(args, "consistency", None))


def cmd_match(args: argparse.Namespace) -> int:
    points = parse_points(args.points) if args.points is not None else read_points_file(args.points_file)
    matcher = _matcher(args)
    src = load_volume(args.source)
    # before the target is read and anything embedded: a point outside A is a typo, not a search
    check_points_inside(src.affine, src.shape, points, str(args.source))
    dst = load_volume(args.target)
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
    def mm(p) -> str:
        return "(" + ", ".join(f"{float(v):.1f}" for v in p) + ") mm"

    rows, titles = [], []
    for n, (q, m, s) in enumerate(list(zip(points, found, scores))[:8], start=1):
        rows.append([ortho_slices(src.array, affine=src.affine, point_world=q, window=(-400.0, 400.0))])
        rows.append([ortho_slices(dst.array, affine=dst.affine, point_world=m, window=(-400.0, 400.0))])
        titles += [f"A: query {n} at {mm(q)}", f"B: match {n} at {mm(m)}, score {float(s):.3f}"]
    return write_png(path, mosaic(rows, row_titles=titles))


def cmd_embed(args: argparse.Namespace) -> int:
    if args.data is not None:
        return _embed_store(args)
    if not args.images:
        raise MatchError("embed: give IMAGEs or --data STORE")
    matcher = _matcher(args)
    matcher.name_sources(args.images)  # logs tell apart series of the same file name
    for image in args.images:
        t0 = time.perf_counter()
        emb = matcher.embed(image)
        print(json.dumps({"image": str(image), "fine_shape": list(emb.fine_shape),
                          "cache": str(matcher.cache_path(emb.key)) if matcher.use_cache else None,
                          "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def _embed_store(args: argparse.Namespace) -> int:
    if args.images:
        raise MatchError("embed: give IMAGEs or --data STORE, not both")
    try:
        shard = parse_shard(args.shard) if args.shard else env_shard()
    except ValueError as e:
        raise MatchError(str(e)) from None
    store = open_store(args.data)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process of the node
    # Under torchrun: a (gloo) process group for the preparation's barriers; run_main leaves it.
    init_distributed(torch.device("cpu"), PREPARE_TIMEOUT_S)
    # the store keeps the embeddings; a second copy in the embedding cache would only cost disk
    matcher = Matcher(args.model, cache_dir=args.cache_dir, device=device, use_cache=False)
    counts = prepare_store(matcher, store, fits=True, keep_embeddings=True, shard=shard)
    sizes = [entry_bytes(p) for p in store.root.glob(f"cases/*/landmark/{matcher.model_key[:20]}{GROUP_SUFFIX}")]
    print(json.dumps({"store": str(store.root), "shard": list(shard) if shard else None, **counts,
                      "reference": store_reference(store)["name"],
                      "embedding_mb_per_case": round(sum(sizes) / max(len(sizes), 1) / 1e6, 2)}))
    if is_dist() and is_main_process():  # after prepare_store's last barrier: all shares are in
        log.info("every process's share is done: %s is prepared for pairs", store.root)
    return 0


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} bytes"


def cmd_cache(args: argparse.Namespace) -> int:
    folder = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    if args.clear:
        n, freed = clear_cache(folder)
        print(f"removed {n} cache entries ({_size(freed)}) from {folder}")
        return 0
    cap = cache_max_bytes()
    info = cache_info(folder)
    stamp = lambda e: f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e[0]))}  {e[2]}"  # noqa: E731
    print(f"directory: {folder}")
    print(f"entries: {len(info['entries'])} ({info['embeddings']} embeddings, {info['pairs']} pair maps)")
    print(f"total: {_size(info['bytes'])} ({info['bytes']} bytes)")
    print(f"cap: {'none' if cap is None else _size(cap)} (set with {MAX_GB_ENV})")
    if info["entries"]:
        print(f"oldest: {stamp(info['entries'][0])}")
        print(f"newest: {stamp(info['entries'][-1])}")
    if info.get("old_embeddings"):
        print(f"older-format embedding files: {info['old_embeddings']} ({_size(info['old_bytes'])}), ignored; "
              "cache --clear deletes them")
    return 0


def _attach_points(argv: list[str]) -> list[str]:
    """``--points -10,150,120`` -> ``--points=-10,150,120``.

    argparse reads a value that starts with '-' (the first coordinate of every patient-left
    point in RAS) as an option and stops with "expected one argument".
    """
    out = []
    it = iter(argv)
    for a in it:
        if a == "--":
            out += [a, *it]
            break
        if a == "--points":
            value = next(it, None)
            out.append(a if value is None else f"--points={value}")
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(_attach_points(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(getattr(args, "verbose", False))
    commands = {"train": cmd_train, "match": cmd_match, "embed": cmd_embed, "cache": cmd_cache}

    run_main(lambda: commands[args.command](args))  # every Alice3DError becomes one "error: ..." line


if __name__ == "__main__":
    main()
