"""Landmark matcher speed: embedding time per volume, cache load time, per-query latency.

    python scripts/bench_landmark.py [--model RUN/landmark.pt] [--device cpu|cuda] [--threads N]

Volumes: two subjects of the embedded phantom cohort (about 210 x 210 x 140 voxels at
2 mm, i.e. an abdomen). Query latency is measured with a warm cache (embeddings already
computed), single queries and a batch of 100, for each search mode (coarse-to-fine, exact pruned, full)
of the per-point argmax, and how often the coarse-to-fine result differs from the full search;
then the default ``affine`` consistency: the one-time fit per volume pair and the queries after it. Without --model an
untrained network of the default configuration is used (its flat similarity maps are the
worst case for the pruned search).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, when imported from elsewhere

import bench_common as bc  # noqa: E402
from landmark.embed_cache import entry_bytes  # noqa: E402


def _timed(fn, repeats: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def phantom_pair(n: int = 16, seed: int = 0) -> list:
    """Subjects 1 and 2 of the embedded phantom cohort ``default_cohort(n, seed)`` (abdomen-sized)."""
    from alice3d.data.io import load_volume
    from alice3d.data.phantom import default_cohort

    root = default_cohort(n=n, seed=seed)
    return [load_volume(root / "imagesTr" / f"img000{i}.nii.gz") for i in (1, 2)]


def time_embedding(model, vols, cache: str | Path, device: str, **matcher_kw) -> tuple[dict, list]:
    """Cold embedding of each volume into an empty ``cache``, then the load of the cached ones
    -> (figures, embeddings). ``matcher_kw`` go to ``Matcher`` (e.g. ``spacing``)."""
    from landmark.match import Matcher

    m = Matcher(model, cache_dir=cache, device=device, **matcher_kw)
    t_embed, embs = [], []
    for v in vols:
        t, emb = _timed(lambda v=v: m.embed(v))
        t_embed.append(t)
        embs.append(emb)
    bc.synchronize(torch.device(device))
    result = {"embed_s_per_volume": [round(t, 3) for t in t_embed], "fine_grid": list(embs[0].fine_shape),
              "cache_mb_per_volume": round(sum(entry_bytes(f) for f in Path(cache).rglob("*.zarr")) / len(vols) / 2**20, 1)}
    warm = Matcher(model, cache_dir=cache, device=device, consistency="none", **matcher_kw)
    t_load, _ = _timed(lambda: [warm.embed(v) for v in vols])
    result["cache_load_s_per_volume"] = round(t_load / len(vols), 3)
    return result, embs


def time_queries(matcher, ea, eb, pts, singles: int = 20, repeats: int = 3) -> tuple[dict, np.ndarray]:
    """Per-query latency (median of ``singles`` one-point queries) and the time of all ``pts`` in
    one batched call (median of ``repeats``), after a warm-up -> (figures, matched points)."""
    matcher.match_embeddings(ea, eb, pts[:2])  # warm-up (and the one-time pair fit, if any)
    times = [_timed(lambda q=q: matcher.match_embeddings(ea, eb, q[None]))[0] for q in pts[:singles]]
    t_batch, found = _timed(lambda: matcher.match_embeddings(ea, eb, pts), repeats=repeats)
    return {"ms_per_query": round(1000 * statistics.median(times), 2), "s_per_batch": round(t_batch, 3),
            "batch": len(pts)}, found[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="RUN/landmark.pt (default: untrained default config)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from alice3d.analysis.landmark_accuracy import sample_body_points
    from landmark.config import LandmarkConfig
    from landmark.match import Matcher
    from landmark.model import build_model

    vols = phantom_pair()
    if args.model is not None:
        model = args.model
    else:
        torch.manual_seed(0)
        model = build_model(LandmarkConfig().model).eval()
    result: dict = {"device": args.device, "threads": torch.get_num_threads(), "model": str(args.model),
                    "volume_shape": list(vols[0].shape), "volume_spacing": [round(s, 2) for s in vols[0].spacing]}
    with tempfile.TemporaryDirectory() as cache:
        embedded, _ = time_embedding(model, vols, cache, args.device)
        result.update(embedded)
        warm = Matcher(model, cache_dir=cache, device=args.device, consistency="none")
        rng = np.random.default_rng(0)
        pts = sample_body_points(vols[0], args.queries, rng)
        ea, eb = warm.embed(vols[0]), warm.embed(vols[1])
        found = {}
        for search in ("coarse", "pruned", "full"):
            warm.search = search
            figures, found[search] = time_queries(warm, ea, eb, pts)
            result[f"{search}_ms_per_query"] = figures["ms_per_query"]
            result[f"{search}_s_per_{args.queries}_queries"] = figures["s_per_batch"]
        # The coarse-to-fine search is a restriction of the full one: how often does it disagree?
        gap = np.linalg.norm(np.asarray(found["coarse"]) - np.asarray(found["full"]), axis=1)
        result["coarse_vs_full_same_point_frac"] = round(float((gap < 1e-3).mean()), 3)
        result["coarse_vs_full_mean_gap_mm"] = round(float(gap.mean()), 3)
        # Default matching: a robust affine per volume pair (fitted once), then every query maps through it.
        warm.search, warm.consistency = ("coarse" if args.device == "cpu" else "full"), "affine"
        t_fit, transform = _timed(lambda: warm.pair_transform(ea, eb))
        result["affine_fit_s_per_pair"] = round(t_fit, 3)
        result["affine_anchors_consistent"] = None if transform is None else f"{transform.inliers}/{transform.anchors}"
        figures, _ = time_queries(warm, ea, eb, pts)
        result["affine_ms_per_query"] = figures["ms_per_query"]
        result[f"affine_s_per_{args.queries}_queries"] = figures["s_per_batch"]
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
