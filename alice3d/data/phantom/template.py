"""Template abdomen of the synthetic CT cohort: a tissue-class volume in template millimetres.

Template coordinates are RAS+ (x to the patient's Right, y Anterior, z Superior) with the
L1 vertebral body centre near z = 0. The template is painted once (deterministic, no random
state per subject) on a regular grid; subjects are rendered by mapping their voxel world
coordinates into this space (see maps.py) and looking tissue classes up here.

Painting is layered: first the z-parametric structures slab by slab (body wall, muscles,
spine, ribs, lungs, heart, aorta, IVC, oesophagus), then bowel, then organs and vessels in
an order where each may only overwrite the tissues listed in its `over` set, so organs fit
into the abdominal cavity and stay out of bone, muscle wall and lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline

TEMPLATE_VERSION = 2

# ----------------------------------------------------------------------------- tissues

# tissue id -> (name, BTCV label id)
TISSUES: dict[int, tuple[str, int]] = {
    0: ("air", 0),
    1: ("skin", 0),
    2: ("subcutaneous_fat", 0),
    3: ("muscle", 0),
    4: ("visceral_fat", 0),
    5: ("bone_cortex", 0),
    6: ("bone_marrow", 0),
    7: ("disc", 0),
    8: ("spinal_canal", 0),
    9: ("lung", 0),
    10: ("myocardium", 0),
    11: ("heart_blood", 0),
    12: ("bowel_wall", 0),
    13: ("bowel_fluid", 0),
    14: ("bowel_air", 0),
    15: ("feces", 0),
    16: ("cartilage", 0),
    17: ("artery", 0),
    18: ("vein", 0),
    19: ("urine", 0),
    20: ("spleen", 1),
    21: ("kidney_cortex_r", 2),
    22: ("kidney_medulla_r", 2),
    23: ("kidney_cortex_l", 3),
    24: ("kidney_medulla_l", 3),
    25: ("gallbladder", 4),
    26: ("esophagus", 5),
    27: ("esophagus_air", 5),
    28: ("liver", 6),
    29: ("hepatic_vein", 6),
    30: ("portal_branch", 6),
    31: ("stomach_wall", 7),
    32: ("stomach_fluid", 7),
    33: ("stomach_air", 7),
    34: ("aorta", 8),
    35: ("ivc", 9),
    36: ("portal_splenic_vein", 10),
    37: ("pancreas", 11),
    38: ("adrenal_r", 12),
    39: ("adrenal_l", 13),
    40: ("renal_sinus_fat", 0),
}
T = {name: tid for tid, (name, _) in TISSUES.items()}
N_TISSUES = max(TISSUES) + 1


def tissue_to_label() -> np.ndarray:
    """(256,) uint8 lookup: tissue id -> BTCV label id."""
    lut = np.zeros(256, dtype=np.uint8)
    for tid, (_, lab) in TISSUES.items():
        lut[tid] = lab
    return lut


SOFT = (T["visceral_fat"], T["bowel_wall"], T["bowel_fluid"], T["bowel_air"], T["feces"])

# Template extent (mm); voxels outside map to the nearest edge voxel (air in x and y).
EXTENT_LO = np.array([-174.0, -104.0, -264.0])
EXTENT_HI = np.array([174.0, 118.0, 228.0])


@dataclass
class Template:
    """Tissue ids (nx, ny, nz) uint8 on a grid: voxel i sits at origin + i * res (mm)."""

    tissue: np.ndarray
    origin: np.ndarray
    res: float

    def coords(self, axis: int, sl: slice = slice(None)) -> np.ndarray:
        n = self.tissue.shape[axis]
        idx = np.arange(n)[sl]
        return (self.origin[axis] + idx * self.res).astype(np.float32)

    def index_box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices covering the mm box [lo, hi] (clipped to the grid)."""
        a = np.floor((np.asarray(lo) - self.origin) / self.res).astype(int)
        b = np.ceil((np.asarray(hi) - self.origin) / self.res).astype(int) + 1
        n = self.tissue.shape
        return tuple(slice(max(0, int(a[k])), min(n[k], int(b[k]))) for k in range(3))

    def grid(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate arrays (n,1,1), (1,n,1), (1,1,n) for index slices `box`."""
        x = self.coords(0, box[0])[:, None, None]
        y = self.coords(1, box[1])[None, :, None]
        z = self.coords(2, box[2])[None, None, :]
        return x, y, z


# ----------------------------------------------------------------------------- primitives


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (3, 3) from angles in degrees, applied as Rz @ Ry @ Rx."""
    a, b, c = np.deg2rad([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


def ellipsoid_norm(x, y, z, centre, radii, rot=None) -> np.ndarray:
    """Normalised radius |R^T (p - c) / r| (< 1 inside) on broadcast coordinate arrays."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    rot = np.eye(3) if rot is None else rot
    acc = 0.0
    for k in range(3):
        lk = rot[0, k] * dx + rot[1, k] * dy + rot[2, k] * dz
        acc = acc + (lk / radii[k]) ** 2
    return np.sqrt(acc).astype(np.float32)


def ellipsoid_box(centre, radii, rot=None) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding box (lo, hi) of a rotated ellipsoid."""
    rot = np.eye(3) if rot is None else rot
    half = np.sqrt(((rot * np.asarray(radii, dtype=float)[None, :]) ** 2).sum(axis=1))
    c = np.asarray(centre, dtype=float)
    return c - half, c + half


def sample_curve(points, radii, step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Smooth centreline through control points -> (M, 3) samples every ~`step` mm and radii (M,)."""
    pts = np.asarray(points, dtype=float)
    rad = np.asarray(radii, dtype=float)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(t[-1] / step)) + 1)
    ts = np.linspace(0.0, t[-1], n)
    if len(pts) > 2:
        curve = CubicSpline(t, pts, bc_type="natural")(ts)
    else:
        curve = pts[0] + (pts[1] - pts[0]) * (ts / t[-1])[:, None]
    return curve, np.interp(ts, t, rad)


def tube_sdf(tmpl: Template, points, radii):
    """Approximate signed distance (mm, < 0 inside) to a tube of varying radius.

    The centreline is a cubic spline through `points`, cut into short cone segments; each
    segment only touches its own small box. Returns (box, sdf (bx, by, bz) float32), with
    sdf = +inf where no segment reaches.
    """
    rad_all = np.asarray(radii, dtype=float)
    step = max(2.0 * tmpl.res, 0.4 * float(rad_all.min()))
    curve, rad = sample_curve(points, radii, step=step)
    rmax = float(rad.max())
    box = tmpl.index_box(curve.min(0) - rmax, curve.max(0) + rmax)
    origin = np.array([tmpl.coords(k, box[k])[0] for k in range(3)])
    shape = tuple(sl.stop - sl.start for sl in box)
    sdf = np.full(shape, np.inf, dtype=np.float32)
    for i in range(len(curve) - 1):
        p0, p1, r0, r1 = curve[i], curve[i + 1], rad[i], rad[i + 1]
        rr = max(r0, r1)
        lo = np.floor((np.minimum(p0, p1) - rr - origin) / tmpl.res).astype(int)
        hi = np.ceil((np.maximum(p0, p1) + rr - origin) / tmpl.res).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
        if np.any(hi <= lo):
            continue
        x = (origin[0] + np.arange(lo[0], hi[0]) * tmpl.res - p0[0]).astype(np.float32)[:, None, None]
        y = (origin[1] + np.arange(lo[1], hi[1]) * tmpl.res - p0[1]).astype(np.float32)[None, :, None]
        z = (origin[2] + np.arange(lo[2], hi[2]) * tmpl.res - p0[2]).astype(np.float32)[None, None, :]
        d = (p1 - p0).astype(np.float32)
        dd = float(d @ d) or 1.0
        t = np.clip((x * d[0] + y * d[1] + z * d[2]) / dd, 0.0, 1.0)
        dist = np.sqrt((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2) - (r0 + t * (r1 - r0))
        view = sdf[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.minimum(view, dist, out=view)
    return box, sdf


def paint(tmpl: Template, box, mask: np.ndarray, tissue: int, over=None) -> None:
    """Set `tissue` where `mask` (box-shaped) is true and the current tissue is in `over`."""
    sub = tmpl.tissue[box]
    if over is not None:
        mask = mask & np.isin(sub, np.asarray(over, dtype=np.uint8))
    sub[mask] = tissue


def upsample_linear(f: np.ndarray, shape) -> np.ndarray:
    """Separable linear interpolation of a grid onto `shape` with the end points aligned."""
    out = np.asarray(f, dtype=np.float32)
    for ax, n in enumerate(shape):
        m = out.shape[ax]
        if m == n:
            continue
        pos = np.linspace(0.0, m - 1.0, n)
        i0 = np.clip(np.floor(pos).astype(int), 0, max(m - 2, 0))
        w = (pos - i0).astype(np.float32)
        wshape = [1] * out.ndim
        wshape[ax] = n
        w = w.reshape(wshape)
        i1 = np.minimum(i0 + 1, m - 1)
        out = np.take(out, i0, axis=ax) * (1.0 - w) + np.take(out, i1, axis=ax) * w
    return out


def _waves(grid, seed: int, n_modes: int, wavelength) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_modes, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2 * np.pi / rng.uniform(*wavelength, size=n_modes))[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=n_modes)
    f = np.zeros(grid[0].shape)
    for m in range(n_modes):
        f += np.cos(k[m, 0] * grid[0] + k[m, 1] * grid[1] + k[m, 2] * grid[2] + phase[m])
    return f * np.sqrt(2.0 / n_modes)


def smooth_field(tmpl: Template, box, seed: int, n_modes: int = 14, wavelength=(30.0, 60.0), coarse: float = 3.0,
                 square_sum_with: int | None = None):
    """Smooth random field (~unit variance) on a box: random plane waves, evaluated coarsely.

    With `square_sum_with`, returns f1**2 + f2**2 of two independent fields (seeds `seed` and
    `square_sum_with`): small values trace a network of tubes (bowel loops).
    """
    lo = np.array([tmpl.coords(a, box[a])[0] for a in range(3)], dtype=float)
    hi = np.array([tmpl.coords(a, box[a])[-1] for a in range(3)], dtype=float)
    full = tuple(s.stop - s.start for s in box)
    nc = [min(full[a], max(2, int(np.ceil((hi[a] - lo[a]) / coarse)) + 1)) for a in range(3)]
    grid = np.meshgrid(*[np.linspace(lo[a], hi[a], nc[a]) for a in range(3)], indexing="ij")
    f = _waves(grid, seed, n_modes, wavelength)
    if square_sum_with is not None:
        f = f * f + _waves(grid, square_sum_with, n_modes, wavelength) ** 2
    return upsample_linear(f, full)


# ----------------------------------------------------------------------------- z profiles

_ZK = np.array([-264, -200, -150, -60, 40, 120, 228], dtype=float)
_BODY_A = np.array([162, 168, 165, 158, 156, 152, 148], dtype=float)  # half width
_BODY_BA = np.array([100, 108, 110, 112, 108, 104, 100], dtype=float)  # anterior half depth
_BODY_BP = np.array([98, 98, 96, 96, 96, 96, 96], dtype=float)  # posterior half depth


def body_axes(z):
    return np.interp(z, _ZK, _BODY_A), np.interp(z, _ZK, _BODY_BA), np.interp(z, _ZK, _BODY_BP)


def spine_y(z):
    """Vertebral body centre y (mm) and radii (rx, ry) along z; lordosis, kyphosis, sacral tilt."""
    z = np.asarray(z, dtype=float)
    y = -38.0 + 10.0 * np.exp(-(((z + 90.0) / 70.0) ** 2)) - 7.0 * np.clip((z - 40.0) / 160.0, 0, 1)
    y = y - 0.55 * np.clip(-165.0 - z, 0, None)
    lumbar = np.clip((60.0 - z) / 60.0, 0, 1)  # 0 thoracic .. 1 lumbar
    sacral = np.clip((-165.0 - z) / 40.0, 0, 1)
    rx = 17.0 + 7.0 * lumbar + 20.0 * sacral
    ry = 15.0 + 2.5 * lumbar + 2.0 * sacral
    return y, rx, ry


VERT_PERIOD = 33.0  # mm per vertebra (body + disc); L1 centred at z = 0


def diaphragm(x, y):
    """Height (mm) of the diaphragm dome over (x, y): right dome higher, posterior recesses lowest."""
    h = 128.0 + 5.0 * np.tanh(x / 40.0) - 0.010 * np.maximum(np.abs(x) - 50.0, 0.0) ** 2
    h = h - np.where(y > 5.0, 0.003, 0.008) * (y - 5.0) ** 2
    return np.maximum(h, 20.0)


def _interp_path(z, knots):
    """Piecewise-linear path params at heights z from rows (z, p1, p2, ...) sorted by z."""
    k = np.asarray(knots, dtype=float)
    return [np.interp(z, k[:, 0], k[:, j]) for j in range(1, k.shape[1])]


# aorta: z, x, y offset from the vertebral body's anterior surface, radius
_AORTA = [(-110, -10, 10, 9.5), (-40, -14, 10, 10.5), (40, -15, 8, 11.5), (100, -20, -12, 12.0), (228, -25, -18, 12.0)]
# IVC: z, x, y offset from the anterior vertebral surface, rx, ry
_IVC = [(-120, 14, 4, 11, 9), (-40, 24, 6, 13, 9.5), (40, 28, 12, 14, 11), (100, 22, 22, 15, 13), (150, 12, 30, 16, 14)]
# oesophagus: z, x, y offset from the anterior vertebral surface
_ESO = [(72, -32, 30), (85, -26, 22), (110, -14, 10), (150, -6, 6), (228, -2, 5)]


# ----------------------------------------------------------------------------- slab pass


class _Slab:
    """Tissue ids of a z-slab plus the body-wall fields the structures inside it need."""

    def __init__(self, tmpl: Template, z0: int, z1: int):
        self.tmpl = tmpl
        self.box = (slice(None), slice(None), slice(z0, z1))
        x, y, z = tmpl.grid(self.box)
        self.x, self.y, self.z = x, y, z
        self.out = np.zeros((x.shape[0], y.shape[1], z.shape[2]), dtype=np.uint8)
        a, ba, bp = body_axes(z)
        self.a = a.astype(np.float32)
        self.b = np.where(y > 0, ba, bp).astype(np.float32)
        ax, ay = np.abs(x) / self.a, np.abs(y) / self.b
        # superellipse: an ellipse in front, a flatter (p = 3) back for a patient lying supine
        rho = np.where(y > 0, np.sqrt(ax * ax + ay * ay), np.cbrt(ax * ax * ax + ay * ay * ay))
        r = np.sqrt(x * x + y * y)
        self.depth = np.where(rho > 1e-6, r / np.maximum(rho, 1e-6) - r, 1e4).astype(np.float32)
        self.inside = rho < 1.0
        self.fat_t = (17.0 + 6.0 * np.clip(y / 100.0, 0, 1)).astype(np.float32)
        self.musc_t = np.where(z > 40, 15.0, 11.0).astype(np.float32)
        self.yv, self.rxv, self.ryv = (v.astype(np.float32) for v in spine_y(z))
        self.yc = self.yv - self.ryv - 10.0  # spinal canal centre

    def sub(self, xr, yr):
        """(view of out, x, y, z, index slices) restricted to x in xr, y in yr (mm)."""
        t = self.tmpl
        ix = slice(max(0, int((xr[0] - t.origin[0]) / t.res)), max(0, int(np.ceil((xr[1] - t.origin[0]) / t.res)) + 1))
        iy = slice(max(0, int((yr[0] - t.origin[1]) / t.res)), max(0, int(np.ceil((yr[1] - t.origin[1]) / t.res)) + 1))
        return self.out[ix, iy], self.x[ix], self.y[:, iy], self.z, (ix, iy)


def _paint_slab(tmpl: Template, z0: int, z1: int) -> None:
    """Body wall, muscles, spine, ribs, pelvis, lungs, heart and the big z-running vessels."""
    sl = _Slab(tmpl, z0, z1)
    out, z, inside, depth = sl.out, sl.z, sl.inside, sl.depth
    out[inside] = T["visceral_fat"]
    out[inside & (depth < sl.fat_t + sl.musc_t)] = T["muscle"]
    out[inside & (depth < sl.fat_t)] = T["subcutaneous_fat"]
    out[inside & (depth < 2.0)] = T["skin"]
    if float(z.max()) > 20.0:
        _paint_thorax(sl)
    _paint_back_muscles(sl)
    _paint_spine(sl)
    if float(z.max()) > -70.0:
        _paint_ribs(sl)
    if float(z.min()) < -150.0:
        _paint_pelvis(sl)
    _paint_big_vessels(sl)
    tmpl.tissue[sl.box] = out


def _paint_thorax(sl: _Slab) -> None:
    out, x, y, z = sl.out, sl.x, sl.y, sl.z
    cavity = sl.inside & (sl.depth >= sl.fat_t + sl.musc_t)
    above = cavity & (z > diaphragm(x, y))
    medi = ((x + 5.0) / 32.0) ** 2 + ((y - (sl.yv + 12.0)) / 45.0) ** 2 < 1.0
    out[above] = T["lung"]
    out[above & medi] = T["visceral_fat"]
    if float(z.max()) > 115.0:
        hs = ellipsoid_norm(x, y, z, (-22.0, 30.0, 180.0), (66.0, 50.0, 58.0), rotation(rz=-25.0))
        out[above & (hs < 1.08)] = T["visceral_fat"]
        out[above & (hs < 1.0)] = T["myocardium"]
        out[above & (hs < 1.0 - 11.0 / 50.0)] = T["heart_blood"]


def _paint_back_muscles(sl: _Slab) -> None:
    out, x, y, z, ix = sl.sub((-110.0, 110.0), (-110.0, 40.0))
    deep = (sl.inside & (sl.depth >= sl.fat_t))[ix]
    yv, rxv, yc = sl.yv, sl.rxv, sl.yc
    zc = np.clip((-10.0 - z) / 170.0, 0, 1)
    psoas_r = 6.0 + 18.0 * zc
    psoas_y = yv + 4.0 + 0.25 * np.clip(-150.0 - z, 0, None)
    ql_s = np.clip(np.minimum((z + 165.0) / 40.0, (15.0 - z) / 40.0), 0, 1) + 1e-3
    for side in (-1.0, 1.0):
        para = ((x - side * 35.0) / 24.0) ** 2 + ((y - (yc - 22.0)) / 21.0) ** 2 < 1.0
        psoas_x = side * (rxv + 4.0 + psoas_r * 0.9 + 0.12 * np.clip(-10.0 - z, 0, None))
        psoas = (((x - psoas_x) / psoas_r) ** 2 + ((y - psoas_y) / (psoas_r * 0.9)) ** 2 < 1.0) & (z < -8.0)
        ql = ((x - side * 62.0) / (18.0 * ql_s)) ** 2 + ((y - (yv - 26.0)) / (10.0 * ql_s)) ** 2 < 1.0
        out[deep & (para | psoas | ql)] = T["muscle"]


def _paint_spine(sl: _Slab) -> None:
    out, x, y, z, ix = sl.sub((-70.0, 70.0), (-140.0, 0.0))
    deep = (sl.inside & (sl.depth >= sl.fat_t))[ix]
    yv, rxv, ryv, yc = sl.yv, sl.rxv, sl.ryv, sl.yc
    dzv = z - np.rint(z / VERT_PERIOD) * VERT_PERIOD
    sacral = z < -175.0
    disc = (np.abs(dzv) > VERT_PERIOD / 2 - 4.0) & ~sacral
    bs = np.sqrt((x / rxv) ** 2 + ((y - yv) / ryv) ** 2)
    body = deep & (bs < 1.0)
    out[body] = T["bone_marrow"]
    out[body & (bs > 1.0 - 2.5 / ryv)] = T["bone_cortex"]
    out[body & disc] = T["disc"]
    rc = np.sqrt(x * x + (y - yc) ** 2)
    in_level = (np.abs(dzv) < VERT_PERIOD / 2 - 6.0) | sacral
    out[deep & (rc >= 9.0) & (rc < 15.0) & (y < yc + 4.0) & in_level] = T["bone_cortex"]
    out[deep & (rc < 9.0) & ~sacral] = T["spinal_canal"]
    spinous = (np.abs(x) < 4.0) & (y < yc - 12.0) & (y > yc - 40.0) & (dzv > -14.0) & (dzv < 8.0)
    tp_len = np.where(z < 40.0, 46.0, 30.0)
    transverse = (np.abs(x) > 10.0) & (np.abs(x) < tp_len) & (np.abs(y - (yc + 5.0)) < 5.0) & (np.abs(dzv) < 6.0)
    out[deep & (spinous | transverse) & ~sacral] = T["bone_cortex"]


_RIB_LEVELS = np.arange(1, 8)  # vertebra index n (z = 33 n): T12 .. T6


def _paint_ribs(sl: _Slab) -> None:
    band = sl.inside & (sl.depth > sl.fat_t - 4.0) & (sl.depth < sl.fat_t + sl.musc_t + 40.0) & (sl.z > -70.0)
    if not band.any():
        return
    idx = np.nonzero(band)
    shape = band.shape
    px, py, pz = (np.broadcast_to(v, shape)[idx] for v in (sl.x, sl.y, sl.z))
    aa, bb, ft = (np.broadcast_to(v, shape)[idx] for v in (sl.a, sl.b, sl.fat_t))
    dd = sl.depth[idx]
    phi = np.arctan2(np.abs(px) / aa, -py / bb)  # 0 at the back, pi at the front
    sub = sl.out[idx]
    phi0 = np.deg2rad(22.0)
    s = np.clip((phi - phi0) / (np.pi - phi0), 0, 1) ** 1.25
    # near the spine the ribs pass in front of the paraspinal muscles, towards the transverse processes
    rib_depth = ft + 9.0 + 16.0 * np.clip((np.deg2rad(40.0) - phi) / np.deg2rad(18.0), 0, 1)
    dr2 = ((dd - rib_depth) / 5.0) ** 2
    z_lo, z_hi = float(sl.z.min()), float(sl.z.max())
    for n in _RIB_LEVELS:
        if VERT_PERIOD * n + 12.0 < z_lo or VERT_PERIOD * n - 86.0 > z_hi:
            continue
        phi1 = np.deg2rad({1: 70.0, 2: 100.0}.get(int(n), 128.0 + 4.0 * n))
        phi2 = np.deg2rad(min(175.0, 150.0 + 4.0 * n)) if n > 2 else phi1
        zr = VERT_PERIOD * n + 4.0 - 78.0 * s
        e = ((pz - zr) / 5.0) ** 2 + dr2
        on = (phi > phi0) & (e < 1.0)
        bone = on & (phi <= phi1)
        sub[bone] = T["bone_marrow"]
        sub[bone & (e > 0.4)] = T["bone_cortex"]
        sub[on & (phi > phi1) & (phi <= phi2)] = T["cartilage"]
    sternum = (np.abs(px) < 15.0) & (py > 0) & (dd > ft + 1.0) & (dd < ft + 13.0) & (pz > 140.0)
    sub[sternum] = T["bone_marrow"]
    sub[sternum & ((np.abs(px) > 12.5) | (dd < ft + 3.0) | (dd > ft + 11.0))] = T["bone_cortex"]
    sl.out[idx] = sub


def _paint_pelvis(sl: _Slab) -> None:
    out, x, y, z, ix = sl.sub((-150.0, 150.0), (-90.0, 30.0))
    deep = (sl.inside & (sl.depth >= sl.fat_t))[ix]
    for side in (-1.0, 1.0):
        # iliac wing: the lateral half of an ellipsoidal shell, open towards the midline
        cx = side * 72.0
        s = ellipsoid_norm(x, y, z, (cx, -20.0, -252.0), (58.0, 50.0, 100.0))
        lateral = (side * (x - cx) > -8.0) & (y < 28.0) & (z < -152.0)
        shell = deep & (s < 1.0) & (s > 1.0 - 7.0 / 50.0) & lateral
        inner = deep & (s <= 1.0 - 7.0 / 50.0) & (s > 1.0 - 24.0 / 50.0) & lateral & (z < -158.0)
        out[inner & ((out == T["visceral_fat"]) | (out == T["muscle"]))] = T["muscle"]
        out[shell] = T["bone_marrow"]
        out[shell & ((s > 1.0 - 2.0 / 50.0) | (s < 1.0 - 5.0 / 50.0))] = T["bone_cortex"]


def _paint_big_vessels(sl: _Slab) -> None:
    out, x, y, z, ix = sl.sub((-90.0, 90.0), (-80.0, 60.0))
    inside = sl.inside[ix]
    front = sl.yv + sl.ryv  # anterior surface of the vertebral body
    ax_, ay_off, ar = _interp_path(z, _AORTA)
    above_bif = z >= -110.0
    out[inside & above_bif & ((x - ax_) ** 2 + (y - (front + ay_off)) ** 2 < ar**2)] = T["aorta"]
    dz = np.clip(-110.0 - z, 0, None)
    dzv = np.clip(-120.0 - z, 0, None)
    for side in (-1.0, 1.0):  # iliac arteries and, medial-posterior to them, iliac veins
        art = (x - (-10.0 + side * (0.55 * dz + 2.0))) ** 2 + (y - (front + 10.0 + 0.25 * dz)) ** 2 < 6.5**2
        out[inside & ~above_bif & art] = T["artery"]
        vein = (x - (6.0 + side * (0.5 * dzv + 9.0))) ** 2 + (y - (front + 2.0 + 0.25 * dzv)) ** 2 < 7.5**2
        out[inside & (z < -120.0) & vein] = T["vein"]
    vx, vy_off, vrx, vry = _interp_path(z, _IVC)
    ivc = (((x - vx) / vrx) ** 2 + ((y - (front + vy_off)) / vry) ** 2 < 1.0) & (z >= -120.0) & (z <= 150.0)
    out[inside & ivc] = T["ivc"]
    if float(z.max()) >= 72.0:
        ex, ey_off = _interp_path(z, _ESO)
        er = ((x - ex) / 9.0) ** 2 + ((y - (front + ey_off)) / 7.0) ** 2
        eso = inside & (er < 1.0) & (z >= 72.0)
        out[eso] = T["esophagus"]
        out[eso & (er < 0.07) & (z > 120.0)] = T["esophagus_air"]


# ----------------------------------------------------------------------------- organ pass


def _ellipsoid(tmpl, centre, radii, rot=None):
    lo, hi = ellipsoid_box(centre, radii, rot)
    box = tmpl.index_box(lo, hi)
    return box, ellipsoid_norm(*tmpl.grid(box), centre, radii, rot)


def _paint_tube(tmpl, points, radii, tissue, over, wall=None, wall_tissue=None):
    box, sdf = tube_sdf(tmpl, points, radii)
    inside = sdf < 0.0
    paint(tmpl, box, inside, tissue, over)
    if wall is not None:
        paint(tmpl, box, inside & (sdf > -wall), wall_tissue, (tissue,))
    return box, sdf


def _paint_bowel(tmpl: Template) -> None:
    box = tmpl.index_box((-135, -25, -258), (135, 115, -20))
    t = smooth_field(tmpl, box, seed=11, wavelength=(45.0, 75.0), square_sum_with=12)
    f3 = smooth_field(tmpl, box, seed=13, wavelength=(60.0, 110.0))
    paint(tmpl, box, t < 0.75, T["bowel_wall"], (T["visceral_fat"],))
    lumen = t < 0.45
    paint(tmpl, box, lumen, T["bowel_fluid"], (T["bowel_wall"],))
    paint(tmpl, box, lumen & (f3 > 1.25), T["bowel_air"], (T["bowel_fluid"],))
    colon = [(72, 15, -175), (88, -5, -130), (92, -10, -60), (82, 15, -22), (45, 68, -42), (0, 78, -55),
             (-45, 68, -40), (-84, 22, 8), (-98, -8, -40), (-95, -8, -130), (-75, 10, -185), (-35, 25, -205),
             (-10, -25, -228), (0, -50, -264)]
    crad = [30, 26, 25, 24, 22, 22, 22, 24, 22, 22, 20, 18, 18, 20]
    over = (T["visceral_fat"], T["bowel_wall"], T["bowel_fluid"], T["bowel_air"])
    cbox, sdf = _paint_tube(tmpl, colon, crad, T["bowel_wall"], over)
    g = smooth_field(tmpl, cbox, seed=14, wavelength=(14.0, 30.0))
    lumen = sdf < -3.0
    paint(tmpl, cbox, lumen, T["bowel_air"], (T["bowel_wall"],))
    paint(tmpl, cbox, lumen & (g > 0.35), T["feces"], (T["bowel_air"],))


def _paint_kidney(tmpl: Template, side: float, centre, cortex: int, medulla: int) -> None:
    rot = rotation(rx=-12.0, ry=side * 14.0, rz=side * 32.0)
    radii = (26.0, 22.0, 54.0)
    box, s = _ellipsoid(tmpl, centre, radii, rot)
    x, y, z = tmpl.grid(box)
    medial = rot @ np.array([-side, 0.0, 0.0])  # local -x for the right kidney points to the midline
    hil = np.asarray(centre) + medial * radii[0] * 0.95
    dh = np.sqrt((x - hil[0]) ** 2 + (y - hil[1]) ** 2 + (z - hil[2]) ** 2)
    over = SOFT
    kid = (s < 1.0) & (dh > 12.0)
    paint(tmpl, box, kid, cortex, over)
    inner = kid & (s < 1.0 - 6.5 / 22.0)
    paint(tmpl, box, inner, medulla, (cortex,))
    paint(tmpl, box, (s < 1.0) & (dh <= 20.0) & (dh > 12.0) & (s < 0.8), T["renal_sinus_fat"], (cortex, medulla))


def _paint_organs(tmpl: Template) -> None:
    soft = SOFT
    _paint_kidney(tmpl, 1.0, (70.0, -46.0, -45.0), T["kidney_cortex_r"], T["kidney_medulla_r"])
    _paint_kidney(tmpl, -1.0, (-68.0, -43.0, -28.0), T["kidney_cortex_l"], T["kidney_medulla_l"])
    for side, c, tid in ((1.0, (36.0, -30.0, 24.0), T["adrenal_r"]), (-1.0, (-40.0, -24.0, 14.0), T["adrenal_l"])):
        for limb in (-1.0, 1.0):
            rot = rotation(rx=10.0, rz=side * 20.0 + limb * 28.0)
            cc = np.asarray(c) + rot @ np.array([0.0, -9.0, 0.0])
            box, s = _ellipsoid(tmpl, cc, (2.6, 10.0, 15.0), rot)
            paint(tmpl, box, s < 1.0, tid, soft)

    # spleen: crescent (ellipsoid minus an offset ellipsoid on the hilar side)
    rot = rotation(rz=35.0, rx=8.0)
    c = np.array([-92.0, -36.0, 60.0])
    box, s = _ellipsoid(tmpl, c, (28.0, 55.0, 60.0), rot)
    cut = ellipsoid_norm(*tmpl.grid(box), c + rot @ np.array([26.0, 8.0, 0.0]), (20.0, 38.0, 46.0), rot)
    paint(tmpl, box, (s < 1.0) & (cut > 1.0), T["spleen"], soft)

    # duodenum (C-loop), before the pancreas so the head sits inside the loop
    duo = [(30, 46, -2), (48, 30, -8), (52, 12, -40), (42, 6, -70), (10, 12, -78), (-20, 18, -70), (-32, 22, -45)]
    _paint_tube(tmpl, duo, [12, 13, 14, 13, 12, 12, 12], T["bowel_fluid"], soft, wall=3.0, wall_tissue=T["bowel_wall"])

    # liver: right lobe + left lobe + caudate, smooth union of approximate distances
    parts = [((70.0, 0.0, 62.0), (78.0, 88.0, 80.0), rotation(rz=-10.0)),
             ((-15.0, 50.0, 82.0), (72.0, 36.0, 36.0), rotation(rz=-20.0, ry=-12.0)),
             ((18.0, -12.0, 66.0), (22.0, 20.0, 32.0), None)]
    box = tmpl.index_box((-95.0, -95.0, -30.0), (160.0, 100.0, 150.0))
    x, y, z = tmpl.grid(box)
    dist = None
    for cen, rad, rot in parts:
        d = (ellipsoid_norm(x, y, z, cen, rad, rot) - 1.0) * min(rad)
        dist = d if dist is None else _smin(dist, d, 14.0)
    paint(tmpl, box, dist < 0.0, T["liver"], soft)
    liver_over = (T["liver"],)
    hv = [[(20, 25, 118), (70, -5, 95), (110, -20, 70)], [(20, 25, 118), (50, 40, 85), (60, 70, 55)],
          [(20, 25, 118), (-10, 45, 105), (-45, 60, 88)]]
    for path in hv:
        _paint_tube(tmpl, path, [6.0, 4.5, 2.5], T["hepatic_vein"], liver_over)
    for path in ([(45, 12, 35), (75, 0, 48), (105, -10, 55)], [(45, 12, 35), (15, 35, 58), (-25, 50, 70)]):
        _paint_tube(tmpl, path, [5.5, 4.0, 2.5], T["portal_branch"], liver_over)

    # gallbladder in the fossa under the liver
    box, s = _ellipsoid(tmpl, (50.0, 46.0, 2.0), (16.0, 17.0, 36.0), rotation(rx=-38.0, ry=-10.0))
    paint(tmpl, box, s < 1.0, T["gallbladder"], soft + (T["liver"],))

    # stomach: J-shaped tube with a wall; air anteriorly (supine), fluid dependent
    st = [(-30, 8, 68), (-55, -5, 92), (-62, 10, 60), (-50, 38, 25), (-20, 58, 5), (10, 58, 0), (28, 48, -2)]
    box, sdf = _paint_tube(tmpl, st, [10, 34, 38, 33, 24, 16, 11], T["stomach_fluid"], soft)
    y = tmpl.grid(box)[1]
    paint(tmpl, box, (sdf < -5.0) & (y > 38.0), T["stomach_air"], (T["stomach_fluid"],))
    paint(tmpl, box, (sdf < 0.0) & (sdf > -5.0), T["stomach_wall"], (T["stomach_fluid"], T["stomach_air"]))

    # pancreas: head in the duodenal loop, body over the aorta, tail to the splenic hilum
    pan = [(24, 10, -44), (28, 12, -28), (20, 20, -12), (0, 26, -6), (-30, 24, 2), (-60, 6, 12), (-80, -14, 22)]
    _paint_tube(tmpl, pan, [10, 16, 14, 12, 12, 10, 8], T["pancreas"], soft)

    vessel_over = soft + (T["pancreas"],)
    splenic = [(10, 8, -10), (-5, 13, -4), (-30, 11, 4), (-60, -5, 14), (-82, -24, 28)]
    _paint_tube(tmpl, splenic, [6, 5.5, 5, 5, 5], T["portal_splenic_vein"], vessel_over)
    portal = [(10, 8, -10), (22, 10, 6), (36, 12, 24), (47, 12, 36)]
    _paint_tube(tmpl, portal, [7.5, 7.5, 7.5, 6.5], T["portal_splenic_vein"], vessel_over + (T["liver"],))
    _paint_tube(tmpl, [(10, 8, -10), (14, 28, -45), (18, 40, -100)], [5.5, 5.0, 4.0], T["vein"], vessel_over)
    _paint_tube(tmpl, [(-13, 5, -2), (-8, 22, -25), (-2, 38, -60), (5, 45, -110)], [4.5, 4.0, 3.5, 3.0],
                T["artery"], vessel_over)
    _paint_tube(tmpl, [(-14, 4, 20), (-11, 22, 22), (-8, 26, 23)], [4.0, 4.0, 3.5], T["artery"], vessel_over)
    _paint_tube(tmpl, [(-8, 26, 23), (15, 24, 26), (35, 18, 30)], [3.0, 3.0, 2.5], T["artery"], vessel_over)
    _paint_tube(tmpl, [(-8, 26, 23), (-35, 20, 22), (-60, 0, 26), (-78, -20, 30)], [3.0, 3.0, 3.0, 2.5],
                T["artery"], vessel_over)
    lrv = [(-46, -26, -20), (-30, 6, -18), (-14, 15, -17), (8, 10, -16), (22, 4, -16)]
    _paint_tube(tmpl, lrv, [5, 5, 4.5, 5, 5], T["vein"], vessel_over)
    _paint_tube(tmpl, [(48, -30, -38), (34, -12, -32), (24, 2, -28)], [5, 5, 5], T["vein"], vessel_over)
    _paint_tube(tmpl, [(-12, -2, -12), (-30, -14, -18), (-46, -30, -24)], [3.2, 3.0, 2.8], T["artery"], vessel_over)
    _paint_tube(tmpl, [(-6, -6, -14), (20, -10, -22), (48, -32, -38)], [3.2, 3.0, 2.8], T["artery"], vessel_over)

    box, s = _ellipsoid(tmpl, (0.0, 35.0, -262.0), (48.0, 38.0, 35.0))
    paint(tmpl, box, s < 1.0, T["urine"], soft)


def _smin(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


# ----------------------------------------------------------------------------- landmarks

def template_landmarks() -> dict[str, np.ndarray]:
    """Named anatomical points in template mm (RAS+), for correspondence checks."""
    def vert(n):
        y, _, _ = spine_y(VERT_PERIOD * n)
        return (0.0, float(y), VERT_PERIOD * n)

    front = lambda z: float(spine_y(z)[0] + spine_y(z)[2])  # noqa: E731
    pts = {
        "T10_body": vert(3), "T12_body": vert(1), "L1_body": vert(0), "L2_body": vert(-1),
        "L3_body": vert(-2), "L4_body": vert(-3), "L5_body": vert(-4),
        "aortic_bifurcation": (-10.0, front(-110) + 10.0, -110.0),
        "celiac_origin": (-14.0, 4.0, 20.0), "sma_origin": (-13.0, 5.0, -2.0),
        "portal_confluence": (10.0, 8.0, -10.0), "porta_hepatis": (47.0, 12.0, 36.0),
        "esophagogastric_junction": (-30.0, 8.0, 68.0), "pylorus": (28.0, 48.0, -2.0),
        "gallbladder_centre": (50.0, 46.0, 2.0), "spleen_centre": (-92.0, -36.0, 60.0),
        "right_kidney_centre": (70.0, -46.0, -45.0), "left_kidney_centre": (-68.0, -43.0, -28.0),
        "right_adrenal": (36.0, -30.0, 24.0), "left_adrenal": (-40.0, -24.0, 14.0),
        "pancreas_head": (28.0, 12.0, -28.0), "pancreas_tail": (-70.0, -4.0, 17.0),
        "liver_right_lobe": (80.0, 0.0, 55.0), "ivc_hepatic_confluence": (20.0, 25.0, 118.0),
    }
    return {k: np.asarray(v, dtype=np.float64) for k, v in pts.items()}


# ----------------------------------------------------------------------------- build


def build_template(res: float = 1.0, slab_mm: float = 32.0) -> Template:
    """Paint the template on a grid of `res` mm (deterministic; ~55 M voxels at 1 mm)."""
    shape = tuple(int(np.floor((EXTENT_HI[k] - EXTENT_LO[k]) / res)) + 1 for k in range(3))
    tmpl = Template(tissue=np.zeros(shape, dtype=np.uint8), origin=EXTENT_LO.copy(), res=float(res))
    step = max(1, int(round(slab_mm / res)))
    for z0 in range(0, shape[2], step):
        _paint_slab(tmpl, z0, min(shape[2], z0 + step))
    _paint_bowel(tmpl)
    _paint_organs(tmpl)
    # the template edges in x/y are outside the body: keep them air so clamped lookups give air
    tmpl.tissue[[0, -1], :, :] = 0
    tmpl.tissue[:, [0, -1], :] = 0
    return tmpl
