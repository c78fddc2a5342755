"""Synthetic abdominal CT cohort with the 13 BTCV organ labels and exact ground-truth correspondence.

One template anatomy (template.py) is warped into every subject by a smooth invertible
map (maps.py) and rendered on a subject-specific scanner grid (render.py): body and
organ size and shape, pose, field of view, voxel spacing, storage orientation, contrast phase
and noise all vary between subjects. Maps are saved next to the cohort as plain JSON, so the
same anatomical point can be found in any two subjects with `correspond`.

    out = generate_cohort("phantoms", n=30, seed=0, size="btcv")
    maps = load_cohort_maps(out)
    p_b = correspond(maps["img0001"], maps["img0002"], p_a)     # (N, 3) world mm -> world mm

Everything is deterministic for a seed; arrays (and files) are byte-identical between runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from alice3d.runtime import Progress, atomic_write, single_threaded_children

from ...viz.ortho import save_preview
from ..datalists import write_btcv_datalist
from ..io import save_nifti
from .maps import (
    MAPS_FILE,
    SubjectMap,
    case_id,
    correspond,
    landmarks_in_subject,
    load_cohort_maps,
    load_maps_file,
    sample_subject_map,
    write_maps,
)
from .render import SIZES, NoiseBank, SizeSpec, SubjectGeometry, render_subject, sample_geometry
from .template import EXTENT_LO, TEMPLATE_VERSION, Template, build_template, template_landmarks

__all__ = [
    "PHANTOM_VERSION", "SIZES", "SubjectMap", "cache_root", "case_id", "correspond", "default_cohort",
    "generate_cohort", "get_template", "held_out_phantom", "landmarks_in_subject", "load_cohort_maps",
    "load_maps_file", "make_subject", "render_case", "template_landmarks",
]

PHANTOM_VERSION = 2  # bump when the rendered cohort changes; part of the cache key
_COHORT, _HELD_OUT = 0, 1  # random-stream domains: held-out subjects never coincide with cohort ones


def cache_root() -> Path:
    """$ALICE3D_CACHE if set, else ~/.cache/alice3d."""
    env = os.environ.get("ALICE3D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alice3d"


def build_cache_dir(final: Path, build: Callable[[Path], None], finished: Callable[[Path], bool]) -> Path:
    """``build(tmp)`` into a temporary sibling of ``final``, then rename it into place.

    An interrupted build never leaves a half folder at ``final``, and when several processes
    build at once the first finished folder wins (``finished(final)`` tells whether it is one).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.part-"))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, final)
        except OSError:
            if not finished(final):  # not someone else's finished folder: take ours
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


_TEMPLATES: dict[float, Template] = {}


def get_template(res: float) -> Template:
    """The template at `res` mm: from memory, else the on-disk cache (memory-mapped), else built."""
    res = float(res)
    if res in _TEMPLATES:
        return _TEMPLATES[res]

    path = cache_root() / "templates" / f"template-v{TEMPLATE_VERSION}-r{res:g}.npy"
    tissue = None
    if path.is_file():
        try:
            tissue = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            tissue = None
    if tissue is None:
        tissue = build_template(res).tissue
        try:
            with atomic_write(path, file_mode=0o666 & ~_umask()) as fh:
                np.save(fh, tissue)
        except OSError:
            pass  # read-only cache: keep the in-memory template only
    tmpl = Template(tissue=tissue, origin=EXTENT_LO.copy(), res=res)
    _TEMPLATES[res] = tmpl
    return tmpl


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_size(size: str | SizeSpec, spacing: Sequence[float] | None = None) -> SizeSpec:
    if isinstance(size, SizeSpec):
        spec = size
    elif size in SIZES:
        spec = SIZES[size]
    else:
        raise ValueError(f"phantom size {size!r}: expected one of {sorted(SIZES)}")
    if spacing is not None:  # a coarser template is enough for coarse voxels
        res = float(np.clip(min(float(s) for s in spacing) / 2.0, 1.0, 3.0))
        spec = SizeSpec(**{**spec.__dict__, "template_res": res})
    return spec


def make_subject(seed: int, index: int, spec: SizeSpec, *, domain: int = _COHORT, shape=None, spacing=None,
                 orientation: str | None = None) -> tuple[SubjectMap, SubjectGeometry, np.random.Generator]:
    """Map, grid and the random stream (for noise) of subject `index` of cohort `seed`."""
    rng = np.random.default_rng([int(seed), int(index), int(domain)])
    m = sample_subject_map(rng)
    geom = sample_geometry(rng, m, spec, shape=shape, spacing=spacing)
    if orientation is not None:
        geom.orientation = orientation
    return m, geom, rng


_BANKS: dict[int, NoiseBank] = {}


def render_case(seed: int, index: int, spec: SizeSpec, *, domain: int = _COHORT, shape=None, spacing=None,
                orientation: str | None = None):
    """-> (image int16 (X, Y, Z), label uint8, affine, SubjectMap) for one subject, in memory."""
    m, geom, rng = make_subject(seed, index, spec, domain=domain, shape=shape, spacing=spacing, orientation=orientation)
    if seed not in _BANKS:
        _BANKS[seed] = NoiseBank(seed)
    image, label, aff = render_subject(m, geom, get_template(spec.template_res), rng, _BANKS[seed])
    m.meta.update(
        shape=list(image.shape), affine=np.asarray(aff).tolist(), orientation=geom.orientation,
        spacing=[float(s) for s in np.linalg.norm(aff[:3, :3], axis=0)], noise_hu=geom.noise_hu,
    )
    return image, label, aff, m


def _write_case(job: dict) -> dict:
    """Worker: render one subject, write image/label (+ preview); returns its map as a dict."""
    out = Path(job["out"])
    spec = job["spec"]
    image, label, aff, m = render_case(job["seed"], job["index"], spec, domain=job["domain"], shape=job["shape"],
                                       spacing=job["spacing"], orientation=job.get("orientation"))
    save_nifti(image, aff, out / job["image"])
    save_nifti(label, aff, out / job["label"])
    if job.get("preview"):
        save_preview(out / "previews" / f"{job['case']}.png", image, label, affine=aff)
    m.meta.update(image=job["image"], label=job["label"])
    return {"index": job["index"], "case": job["case"], "map": m.to_dict()}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    results = []
    with Progress(len(jobs), "phantoms", unit="subject", enabled=progress) as bar:
        if workers <= 1:
            for job in jobs:
                results.append(_write_case(job))
                bar.update(1)
        else:
            with single_threaded_children(), ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futures = [ex.submit(_write_case, job) for job in jobs]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update(1)
    return sorted(results, key=lambda r: r["index"])


def split_counts(n: int) -> tuple[int, int]:
    """(training, validation) counts: 24/6 for 30 subjects like BTCV, else ~80/20 with >= 1 validation."""
    if n < 2:
        return n, 0
    n_val = 6 if n == 30 else max(1, int(round(0.2 * n)))
    return n - n_val, n_val


def generate_cohort(
    out_dir: str | os.PathLike,
    n: int = 30,
    seed: int = 0,
    size: str | SizeSpec = "small",
    *,
    workers: int | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    preview: bool = False,
    progress: bool = False,
    orientations: Sequence[str] | None = None,
) -> Path:
    """Write a phantom cohort in the BTCV layout and return `out_dir`.

    out_dir/imagesTr/img0001.nii.gz (int16 HU), out_dir/labelsTr/label0001.nii.gz (uint8 BTCV
    ids), out_dir/dataset_0.json (training/validation split), out_dir/phantom_maps.json (maps and
    template landmarks for ground-truth correspondence), out_dir/previews/*.png with `preview`.
    `shape` (nx, ny, nz) / `spacing` (mm) fix the grid of every subject (e.g. tiny test cohorts);
    `orientations` overrides the storage orientation per subject (cycled). `workers` > 1 (the
    automatic choice for large cohorts) starts processes with the spawn method, so a calling
    script needs the usual `if __name__ == "__main__":` guard.
    """
    if n < 1:
        raise ValueError(f"phantom cohort: n must be >= 1, got {n}")
    spec = resolve_size(size, spacing)
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    get_template(spec.template_res)  # build (and cache on disk) once, before any worker starts
    jobs = []
    for i in range(n):
        cid = f"img{i + 1:04d}"
        jobs.append({
            "out": str(out), "seed": int(seed), "index": i, "domain": _COHORT, "spec": spec, "case": cid,
            "shape": None if shape is None else tuple(int(s) for s in shape),
            "spacing": None if spacing is None else tuple(float(s) for s in spacing),
            "image": f"imagesTr/{cid}.nii.gz", "label": f"labelsTr/label{i + 1:04d}.nii.gz", "preview": preview,
            "orientation": None if not orientations else orientations[i % len(orientations)],
        })
    if workers is None:
        voxels = n * (spec.inplane**2) * spec.slices[1] if shape is None else n * int(np.prod(shape))
        workers = min(_cpu_count(), n) if voxels > 2e8 else 1
    results = _run_jobs(jobs, max(1, int(workers)), progress)
    n_train, _ = split_counts(n)
    entries = [{"image": j["image"], "label": j["label"]} for j in jobs]
    write_btcv_datalist(
        out / "dataset_0.json", entries[:n_train], entries[n_train:], name="alice3d-phantoms",
        description=f"alice3d synthetic abdominal CT phantoms (size {spec.name}, seed {seed}, n {n}); "
                    f"BTCV label ids; ground-truth correspondence in {MAPS_FILE}",
        reference="synthetic (alice3d.data.phantom)", release=f"phantom v{PHANTOM_VERSION}",
    )
    write_maps(out / MAPS_FILE, {r["case"]: SubjectMap.from_dict(r["map"]) for r in results},
               phantom_version=PHANTOM_VERSION, seed=int(seed), size=spec.name, n=n)
    return out


def default_cohort(n: int = 16, seed: int = 0, size: str = "small", *, progress: bool = False) -> Path:
    """The embedded default cohort, generated on first use under cache_root()/phantoms and reused.

    Generation goes to a temporary sibling folder that is renamed into place when complete,
    so an interrupted run never leaves a half cohort behind (and concurrent callers agree).
    """
    root = cache_root() / "phantoms"
    final = root / f"{size}-n{n}-s{seed}-v{PHANTOM_VERSION}"
    if (final / "dataset_0.json").is_file() and (final / MAPS_FILE).is_file():
        return final
    return build_cache_dir(final, lambda tmp: generate_cohort(tmp, n=n, seed=seed, size=size, progress=progress),
                           lambda d: (d / "dataset_0.json").is_file())


def held_out_phantom(
    out_path: str | os.PathLike,
    seed: int = 0,
    index: int = 0,
    size: str | SizeSpec = "small",
    *,
    label_path: str | os.PathLike | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
) -> SubjectMap:
    """Write one extra subject (never part of any cohort) to `out_path` (+ label) and its map.

    The map is saved as JSON beside the image (`<name>.map.json`, readable with
    `load_maps_file`) and returned, with its image path, shape and affine in `.meta`.
    """
    spec = resolve_size(size, spacing)
    out_path = Path(out_path)
    image, label, aff, m = render_case(seed, index, spec, domain=_HELD_OUT, shape=shape, spacing=spacing,
                                       orientation=orientation)
    save_nifti(image, aff, out_path)
    m.meta["image"] = str(out_path)
    if label_path is not None:
        save_nifti(label, aff, label_path)
        m.meta["label"] = str(label_path)
    name = case_id(out_path)
    write_maps(out_path.with_name(f"{name}.map.json"), {name: m}, phantom_version=PHANTOM_VERSION, seed=int(seed),
               size=spec.name, held_out_index=int(index))
    return m
