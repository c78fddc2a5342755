"""Landmark matching accuracy on phantom subjects with ground-truth correspondence.

    python scripts/eval_landmark.py --model RUN/landmark.pt [--cohort DIR] [--pairs 20] [--points 50]
    python scripts/eval_landmark.py --model RUN/landmark.pt --cohort openkbp --data OPENKBP/dataset.json \
        [--split test] [--pairs 20] [--json F]

Default test set: a phantom cohort generated with another seed than the training cohort
(subjects never seen in training). Compares the trained model with the same network
untrained and with the bounding-box baseline, each network with the default matching
(``affine``: one fit per volume pair), with one fit per volume to a reference volume and the
pair maps composed (``reference``: O(N) fits instead of O(N^2)) and point by point
(``argmax``); prints a table and one JSON line.

``--cohort openkbp``: real head-and-neck CTs with organ contours (``alice3d-data import openkbp``),
patients of ``--split`` only (never used to train the matcher). Compact organs (brainstem,
parotids, larynx, mandible) are scored by the error of the matched centroid; the spinal cord
and the oesophagus, whose centroids depend on where contouring stopped, by the distance from
the matched point (queried at the structure voxel nearest its centroid) to the structure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="RUN/landmark.pt")
    p.add_argument("--cohort", default=None,
                   help="phantom cohort dir with phantom_maps.json (default: n=--subjects, seed=--cohort-seed), "
                        "or 'openkbp' (with --data)")
    p.add_argument("--data", type=Path, default=None, help="with --cohort openkbp: the imported dataset.json")
    p.add_argument("--split", default="test", help="with --cohort openkbp: the datalist split to evaluate on")
    p.add_argument("--subjects", type=int, default=8, help="subjects of the generated test cohort")
    p.add_argument("--cohort-seed", type=int, default=1, help="seed of the generated test cohort (training uses 0)")
    p.add_argument("--pairs", type=int, default=20, help="random (A, B) subject pairs")
    p.add_argument("--points", type=int, default=50, help="random body points per pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-network baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--local-radius-mm", type=float, nargs="*", default=[],
                   help="with --cohort openkbp: also score affine matching refined by the best voxel within each "
                        "of these radii of the mapped point (a row 'trained_affine_local<R>' each)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    from alice3d.analysis.landmark_accuracy import (
        box_baseline,
        evaluate_pairs,
        format_table,
        load_cases,
        matcher_method,
        reference_method,
        untrained_network,
    )
    from alice3d.data.phantom import default_cohort
    from landmark.match import Matcher, load_landmark_model

    if args.cohort == "openkbp":
        return _openkbp(args)
    cohort = Path(args.cohort) if args.cohort else default_cohort(n=args.subjects, seed=args.cohort_seed)
    t0 = time.perf_counter()
    cases, maps = load_cases(cohort)
    trained = Matcher(args.model, cache_dir=args.cache_dir, device=args.device, memory_items=len(cases))
    trained.name_sources([c.volume for c in cases])  # logs tell apart series of the same file name
    # "affine": the default matching (pair consistency); "argmax": each point on its own
    methods = {"trained_affine": matcher_method(trained, "affine"),
               "trained_reference": reference_method(trained, cases),
               "trained_argmax": matcher_method(trained, "none")}
    if not args.no_untrained:
        _, meta = load_landmark_model(args.model)
        net = untrained_network(meta, [c.volume for c in cases])
        untrained = Matcher(net, use_cache=False, device=args.device, spacing=meta["spacing"],
                            hu_window=meta["hu_window"], memory_items=len(cases))
        methods["untrained_affine"] = matcher_method(untrained, "affine")
        methods["untrained_reference"] = reference_method(untrained, cases)
        methods["untrained_argmax"] = matcher_method(untrained, "none")
    methods["bbox_position"] = box_baseline
    result = evaluate_pairs(cases, maps, methods, n_pairs=args.pairs, n_points=args.points, seed=args.seed)
    result.update(cohort=str(cohort), model=str(args.model), seconds=round(time.perf_counter() - t0, 1),
                  fit_seconds={k: m.fit_seconds for k, m in methods.items() if hasattr(m, "fit_seconds")})
    print(format_table(result))
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def _openkbp(args) -> int:
    from alice3d.analysis.landmark_accuracy import (
        box_baseline,
        evaluate_organ_pairs,
        format_organ_table,
        load_labelled_cases,
        matcher_method,
    )
    from alice3d.data.datalists import load_datalist
    from alice3d.data.importers.openkbp import OARS
    from landmark.match import Matcher

    if args.data is None:
        raise SystemExit("error: --cohort openkbp needs --data OPENKBP/dataset.json (alice3d-data import openkbp)")
    t0 = time.perf_counter()
    cases = load_labelled_cases(load_datalist(args.data, key=args.split))
    ids = {n: i + 1 for i, n in enumerate(OARS)}
    compact = {ids[n]: n for n in ("Brainstem", "RightParotid", "LeftParotid", "Larynx", "Mandible")}
    elongated = {ids[n]: n for n in ("SpinalCord", "Esophagus")}
    trained = Matcher(args.model, cache_dir=args.cache_dir, device=args.device, memory_items=len(cases))
    trained.name_sources([c.volume for c in cases])  # logs tell apart series of the same file name
    methods = {"trained_affine": matcher_method(trained, "affine"), "trained_argmax": matcher_method(trained, "none"),
               "bbox_position": box_baseline}
    for radius in args.local_radius_mm:
        methods[f"trained_affine_local{radius:g}"] = matcher_method(trained, "affine", local_radius_mm=radius)
    result = evaluate_organ_pairs(cases, methods, compact, elongated, n_pairs=args.pairs, seed=args.seed)
    result.update(cohort="openkbp", data=str(args.data), split=args.split, cases=len(cases), model=str(args.model),
                  seconds=round(time.perf_counter() - t0, 1))
    print(format_organ_table(result))
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        write_organ_report(result, args.json.with_suffix(".md"))
    return 0


def write_organ_report(result: dict, path: Path) -> None:
    """The organ table of ``result`` as Markdown, beside the JSON."""
    lines = [f"# Landmark matching on OpenKBP ({result['split']} patients)", "",
             f"Written by `scripts/eval_landmark.py --cohort openkbp` (model `{Path(result['model']).name}`, "
             f"{len(result['pairs'])} patient pairs of {result['cases']} cases, {result['seconds']:.0f} s). Compact "
             "organs: error of the matched centroid; spinal cord and oesophagus: distance from the matched point to "
             "the structure (0 inside).", "",
             "| method | organ | MRE mm | median mm | within 10 mm | n |", "|---|---|---:|---:|---:|---:|"]
    for name, per in result["methods"].items():
        for organ, m in per.items():
            lines.append(f"| {name} | {organ} | {m['mre_mm']:.1f} | {m['median_mm']:.1f} | "
                         f"{100 * m['within_10mm']:.0f} % | {m['n']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
