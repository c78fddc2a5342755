"""Render one phantom subject: voxel grid + subject map + template -> HU image and BTCV labels.

Each voxel centre's world position goes through the subject's backward map into template
space, where the tissue class is looked up (nearest template voxel). The smooth part of the
map is evaluated on a coarse grid (~12 mm) and interpolated linearly, the affine part exactly.
Intensities come from a per-subject HU table (contrast phase, tissue means), a light in-plane
blur (partial volume) and Gaussian noise; outside the circular reconstruction field of view
the scanner padding value -1024 is stored, as in clinical CT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nibabel import orientations as nio

from ..geometry import apply_affine
from .maps import SubjectMap
from .template import T, Template, tissue_to_label

PAD_HU = -1024.0


@dataclass(frozen=True)
class SizeSpec:
    """Voxel-grid statistics of a cohort size preset."""

    name: str
    inplane: int  # voxels along x and y
    spacing_xy: tuple[float, float]  # allowed in-plane spacing (mm)
    spacing_z: tuple[float, ...]  # slice spacings to draw from (mm)
    spacing_z_p: tuple[float, ...]  # their probabilities
    slices: tuple[int, int]  # min, max number of slices
    template_res: float  # template grid (mm)
    noise_hu: tuple[float, float]  # noise standard deviation range (HU)


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec("tiny", 48, (7.0, 9.0), (6.0, 7.0, 8.0), (0.3, 0.4, 0.3), (30, 56), 3.0, (4.0, 8.0)),
    "small": SizeSpec("small", 128, (2.5, 3.3), (3.5, 4.0, 5.0), (0.3, 0.4, 0.3), (44, 80), 1.5, (5.0, 10.0)),
    "btcv": SizeSpec("btcv", 512, (0.6, 0.95), (2.5, 3.0, 5.0), (0.5, 0.3, 0.2), (80, 200), 1.0, (9.0, 16.0)),
}

# storage orientations (axis codes of the saved array) and how often each is drawn
ORIENTATIONS = (("RAS", 0.3), ("LPS", 0.25), ("LAS", 0.25), ("LPI", 0.1), ("RAI", 0.1))


@dataclass
class SubjectGeometry:
    """Voxel grid of one subject: canonical (RAS-ordered) shape/affine plus storage orientation."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # canonical RAS-ordered voxel -> world
    orientation: str = "RAS"
    noise_hu: float = 10.0
    hu: dict = field(default_factory=dict)  # tissue name -> mean HU


def sample_geometry(rng: np.random.Generator, m: SubjectMap, spec: SizeSpec, shape=None, spacing=None) -> SubjectGeometry:
    """Field of view, spacing, slices, orientation and HU table of one subject.

    `shape` (nx, ny, nz) and/or `spacing` (mm) replace the sampled grid; the grid stays centred
    on the body at the sampled cranio-caudal level.
    """
    lin = np.linalg.inv(m.A)  # u -> world linear part
    width = 2 * 168.0 * float(np.linalg.norm(lin[:, 0]))
    depth = 230.0 * float(np.linalg.norm(lin[:, 1]))
    fov = max(width, depth) * rng.uniform(1.08, 1.3)
    sxy = float(np.clip(fov / spec.inplane, *spec.spacing_xy))
    sz = float(rng.choice(spec.spacing_z, p=spec.spacing_z_p))
    # cranio-caudal coverage in template mm: scans start and stop at different levels
    top = rng.uniform(95.0, 215.0)
    nz = int(np.clip(round(rng.uniform(250.0, 400.0) / sz), *spec.slices))
    bottom = max(top - nz * sz, -262.0)
    nz = min(nz, int((top - bottom) / sz))
    dims = np.array([spec.inplane, spec.inplane, nz])
    spac = np.array([sxy, sxy, sz])
    if shape is not None:  # a fixed grid (tests, tiny cohorts): keep the sampled field of view in-plane
        dims = np.array([int(v) for v in shape])
        spac[:2] = fov / dims[:2].max()
    if spacing is not None:
        spac = np.array([float(v) for v in spacing])
    zc_t = 0.5 * (top + bottom)
    centre = m.u_to_world(np.array([[0.0, 6.0, zc_t]]))[0] + np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), 0.0])
    aff = np.eye(4)
    aff[:3, :3] = np.diag(spac)
    aff[:3, 3] = centre - 0.5 * (dims - 1) * spac
    codes, probs = zip(*ORIENTATIONS)
    orient = str(rng.choice(codes, p=probs))
    return SubjectGeometry(tuple(int(d) for d in dims), aff, orient, float(rng.uniform(*spec.noise_hu)), sample_hu(rng))


def sample_hu(rng: np.random.Generator) -> dict[str, float]:
    """Per-subject mean HU per tissue: portal-venous to late-arterial contrast phase + jitter."""
    e = rng.uniform(0.0, 0.6)  # 0 portal venous .. 1 arterial

    def j(mean, sd):
        return float(mean + rng.normal(0.0, sd))

    artery = j(160 + 120 * e, 15)
    ivc = j(150 - 30 * e, 10)
    portal = j(172 - 20 * e, 10)
    hu = {
        "air": -1000.0, "skin": j(40, 5), "subcutaneous_fat": j(-105, 8), "muscle": j(52, 6),
        "visceral_fat": j(-95, 8), "bone_cortex": j(780, 120), "bone_marrow": j(230, 35), "disc": j(85, 8),
        "spinal_canal": j(22, 5), "lung": j(-860, 25), "myocardium": j(105 + 20 * e, 10),
        "heart_blood": j(150 + 80 * e, 15), "bowel_wall": j(60, 8), "bowel_fluid": j(15, 6),
        "bowel_air": j(-985, 8), "feces": j(-140, 30), "cartilage": j(130, 20), "artery": artery,
        "vein": ivc, "urine": j(10, 4), "spleen": j(108 + 10 * e, 8), "kidney_cortex_r": 0.0,
        "gallbladder": j(12, 5), "esophagus": j(48, 6), "esophagus_air": -990.0,
        "liver": j(70 - 12 * e, 7), "hepatic_vein": ivc, "portal_branch": portal, "stomach_wall": j(72, 8),
        "stomach_fluid": j(12, 5), "stomach_air": j(-990, 5), "aorta": artery, "ivc": ivc,
        "portal_splenic_vein": portal, "pancreas": j(95 + 15 * e, 8), "adrenal_r": j(52, 6),
        "renal_sinus_fat": j(-85, 10),
    }
    cortex, medulla = j(185 + 20 * e, 12), j(175 - 80 * e, 12)
    hu.update(kidney_cortex_r=cortex, kidney_cortex_l=cortex, kidney_medulla_r=medulla, kidney_medulla_l=medulla)
    hu["adrenal_l"] = hu["adrenal_r"]
    return hu


def hu_table(hu: dict[str, float]) -> np.ndarray:
    """(256,) float32 tissue id -> HU."""
    lut = np.full(256, -1000.0, dtype=np.float32)
    for name, tid in T.items():
        lut[tid] = hu.get(name, -1000.0)
    return lut


class NoiseBank:
    """A block of N(0, 1) float32 samples reused at random offsets: cheap noise for big volumes."""

    def __init__(self, seed: int, size: int = 1 << 22):
        self.values = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)

    def draw(self, rng: np.random.Generator, shape) -> np.ndarray:
        n = int(np.prod(shape))
        v = self.values
        if n > v.size // 2:
            reps = -(-n // (v.size // 2)) + 1
            v = np.tile(v, reps)
        start = int(rng.integers(0, v.size - n))
        return v[start:start + n].reshape(shape)


def _lerp_index(n: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Left node index (n,) and weight (n,) float32 for `count` nodes at linspace(0, n - 1) onto 0..n-1."""
    pos = np.arange(n, dtype=np.float64) * (count - 1) / max(n - 1, 1)
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(count - 2, 0))
    return i0, (pos - i0).astype(np.float32)


def _lerp(g: np.ndarray, i0: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `g` along `axis` at non-decreasing left nodes `i0` with weights `w`.

    Uses np.repeat of contiguous runs (no BLAS, whose threads thrash on a busy machine, and
    faster than a general gather).
    """
    if g.shape[axis] == 1:
        return np.repeat(g, len(i0), axis=axis)
    counts = np.bincount(i0, minlength=g.shape[axis] - 1)
    shape = [1] * g.ndim
    shape[axis] = len(i0)
    out = np.repeat(np.diff(g, axis=axis), counts, axis=axis)
    out *= w.reshape(shape)
    out += np.repeat(np.take(g, np.arange(g.shape[axis] - 1), axis=axis), counts, axis=axis)
    return out


def _node_count(n: int, spacing: float, step_mm: float) -> int:
    return int(min(max(n, 2), max(2, int(np.ceil((n - 1) * spacing / step_mm)) + 1)))


def storage_affine(geom: SubjectGeometry) -> np.ndarray:
    """Voxel -> world affine of the stored array (canonical grid flipped to `geom.orientation`)."""
    transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(geom.orientation)))
    if not np.array_equal(transform[:, 0], [0, 1, 2]):
        raise ValueError(f"phantom orientation {geom.orientation!r}: only axis flips of RAS are supported")
    return geom.affine @ nio.inv_ornt_aff(transform, geom.shape)


def render_subject(
    m: SubjectMap, geom: SubjectGeometry, tmpl: Template, rng: np.random.Generator, bank: NoiseBank,
    slab: int = 8, coarse_mm: float = 12.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (image int16 (X, Y, Z), label uint8 (X, Y, Z), affine (4, 4)) in the storage orientation.

    The arrays are Fortran-ordered (x fastest), the order NIfTI stores, so writing needs no copy.
    """
    aff = storage_affine(geom)
    nx, ny, nz = geom.shape
    sp = np.linalg.norm(aff[:3, :3], axis=0)
    counts = [_node_count(n, float(sp[k]), coarse_mm) for k, n in enumerate(geom.shape)]
    nodes = [np.linspace(0.0, n - 1.0, c) for n, c in zip(geom.shape, counts)]
    g = np.stack(np.meshgrid(*nodes, indexing="ij"), -1).reshape(-1, 3)
    u = apply_affine(aff, g) @ m.A.T + m.t
    # template index (+ 0.5 so that truncation rounds) at the coarse nodes: the affine part is
    # reproduced exactly by linear interpolation, the smooth displacement approximately
    idx = (u + m.displacement(u) - tmpl.origin) / tmpl.res + 0.5
    coarse = idx.reshape(tuple(counts) + (3,)).transpose(3, 2, 1, 0).astype(np.float32)  # (3, C, B, A)
    (ix0, wx), (iy0, wy), (iz0, wz) = (_lerp_index(n, c) for n, c in zip(geom.shape, counts))

    tshape = tmpl.tissue.shape
    flat_t = tmpl.tissue.reshape(-1)
    lut_hu = hu_table(geom.hu)
    lut_lab = tissue_to_label()
    image = np.empty((nz, ny, nx), dtype=np.int16)
    label = np.empty((nz, ny, nx), dtype=np.uint8)
    # circular reconstruction field of view inscribed in the in-plane grid
    yy = (np.arange(ny) - (ny - 1) / 2.0) / (ny / 2.0)
    xx = (np.arange(nx) - (nx - 1) / 2.0) / (nx / 2.0)
    outside = np.flatnonzero((yy[:, None] ** 2 + xx[None, :] ** 2 > 1.0).ravel())
    strides = (np.int32(tshape[1] * tshape[2]), np.int32(tshape[2]), np.int32(1))
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        fz = _lerp(coarse, iz0[k0:k1], wz[k0:k1], axis=1)  # (3, nzs, B, A)
        fy = _lerp(fz, iy0, wy, axis=2)  # (3, nzs, ny, A)
        flat = None
        for c in range(3):
            f = _lerp(fy[c], ix0, wx, axis=2)  # (nzs, ny, nx)
            np.clip(f, 0.0, tshape[c] - 0.51, out=f)
            ic = f.astype(np.int32)
            if c < 2:
                ic *= strides[c]
            if flat is None:
                flat = ic
            else:
                flat += ic
        tissue = flat_t[flat]
        hu = lut_hu[tissue]
        # partial-volume blur: [1, 2, 1] / 4 along x then y
        hb = hu.copy()
        hb[:, :, 1:-1] += hb[:, :, 1:-1]
        hb[:, :, 1:-1] += hu[:, :, :-2]
        hb[:, :, 1:-1] += hu[:, :, 2:]
        hb[:, :, 1:-1] *= 0.25
        hu[:, 1:-1] = hb[:, 1:-1]
        hu[:, 1:-1] += hb[:, 1:-1]
        hu[:, 1:-1] += hb[:, :-2]
        hu[:, 1:-1] += hb[:, 2:]
        hu[:, 1:-1] *= 0.25
        hu += geom.noise_hu * bank.draw(rng, hu.shape)
        hu2 = hu.reshape(k1 - k0, -1)
        hu2[:, outside] = PAD_HU
        np.clip(hu, -1024.0, 3071.0, out=hu)
        np.rint(hu, out=hu)
        image[k0:k1] = hu
        lab = lut_lab[tissue].reshape(k1 - k0, -1)
        lab[:, outside] = 0
        label[k0:k1] = lab.reshape(k1 - k0, ny, nx)
    return image.T, label.T, aff
