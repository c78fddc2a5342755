"""Landmark matching accuracy on phantom subjects with ground-truth correspondence.

    python scripts/eval_landmark.py --model RUN/landmark.pt [--cohort DIR] [--pairs 20] [--points 50]

Default test set: a phantom cohort generated with another seed than the training cohort
(subjects never seen in training). Compares the trained model with the same network
untrained and with the bounding-box baseline, each network with the default matching
(``affine``: one fit per volume pair), with one fit per volume to a reference volume and the
pair maps composed (``reference``: O(N) fits instead of O(N^2)) and point by point
(``argmax``); prints a table and one JSON line.
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
    p.add_argument("--cohort", type=Path, default=None,
                   help="phantom cohort dir with phantom_maps.json (default: n=--subjects, seed=--cohort-seed)")
    p.add_argument("--subjects", type=int, default=8, help="subjects of the generated test cohort")
    p.add_argument("--cohort-seed", type=int, default=1, help="seed of the generated test cohort (training uses 0)")
    p.add_argument("--pairs", type=int, default=20, help="random (A, B) subject pairs")
    p.add_argument("--points", type=int, default=50, help="random body points per pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-network baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    from alice3d.data.phantom import default_cohort
    from landmark.evaluate import (
        box_baseline,
        evaluate_pairs,
        format_table,
        load_cases,
        matcher_method,
        reference_method,
        untrained_network,
    )
    from landmark.match import Matcher, load_landmark_model

    cohort = args.cohort or default_cohort(n=args.subjects, seed=args.cohort_seed)
    t0 = time.perf_counter()
    cases, maps = load_cases(cohort)
    trained = Matcher(args.model, cache_dir=args.cache_dir, device=args.device, memory_items=len(cases))
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


if __name__ == "__main__":
    raise SystemExit(main())
