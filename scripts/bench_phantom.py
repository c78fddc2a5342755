"""Benchmark phantom cohort generation: wall and CPU time per size, as a table and JSON.

    python scripts/bench_phantom.py --size btcv --n 30 --workers 2 --json bench_phantom.json

The template build is timed separately ("cold": a fresh cache folder, so it is built and
saved; the cohort run then reuses it, as every later run does). CPU time includes the
worker processes; the load average is printed because a shared machine slows wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.nii.gz")) / 1e6


def bench(size: str, n: int, workers: int | None, seed: int, keep: Path | None) -> dict:
    from alice3d.data.phantom import cohort as phantom

    out = Path(tempfile.mkdtemp(prefix=f"bench-{size}-")) if keep is None else keep
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    os.environ["ALICE3D_CACHE"] = str(cache)
    phantom._TEMPLATES.clear()
    try:
        spec = phantom.resolve_size(size)
        t0, c0 = time.perf_counter(), _cpu()
        phantom.get_template(spec.template_res)
        t_tmpl, c_tmpl = time.perf_counter() - t0, _cpu() - c0
        phantom._TEMPLATES.clear()  # workers and the parent read the saved template, like a later run
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), _cpu()
        phantom.generate_cohort(out, n=n, seed=seed, size=size, workers=workers, progress=sys.stderr.isatty())
        t_gen, c_gen = time.perf_counter() - t0, _cpu() - c0
        import nibabel as nib

        voxels = sum(int(nib.load(str(p)).header.get_data_shape()[0]) * int(nib.load(str(p)).header.get_data_shape()[1])
                     * int(nib.load(str(p)).header.get_data_shape()[2]) for p in (out / "imagesTr").glob("*.nii.gz"))
        return {
            "size": size, "n": n, "workers": workers, "template_res_mm": spec.template_res,
            "template_wall_s": round(t_tmpl, 2), "template_cpu_s": round(c_tmpl, 2),
            "cohort_wall_s": round(t_gen, 2), "cohort_cpu_s": round(c_gen, 2),
            "total_cold_wall_s": round(t_tmpl + t_gen, 2),
            "wall_s_per_subject": round(t_gen / n, 3), "cpu_s_per_subject": round(c_gen / n, 3),
            "megavoxels": round(voxels / 1e6, 1), "mb_written": round(_dir_mb(out), 1),
            "load_avg_before": round(load0, 2), "load_avg_after": round(os.getloadavg()[0], 2),
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", action="append", default=None, help="size preset(s) (default: small and btcv)")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: automatic)")
    p.add_argument("--keep", type=Path, default=None, help="write the cohort here instead of a temporary folder")
    p.add_argument("--json", type=Path, default=Path("bench_phantom.json"))
    args = p.parse_args(argv)
    rows = [bench(s, args.n, args.workers, args.seed, args.keep) for s in (args.size or ["small", "btcv"])]
    cols = ["size", "n", "workers", "template_wall_s", "cohort_wall_s", "cohort_cpu_s", "total_cold_wall_s",
            "wall_s_per_subject", "megavoxels", "mb_written", "load_avg_before"]
    print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores")
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>14}" for c in cols))
    doc = {"machine": {"cores": len(os.sched_getaffinity(0)), "platform": platform.platform()}, "results": rows}
    args.json.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
