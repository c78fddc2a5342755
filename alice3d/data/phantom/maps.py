"""Smooth invertible maps between a phantom subject's world (RAS mm) and template mm.

    backward(p) = u + D(u),  u = A p + t          (world -> template, closed form)
    forward(q)  = A^-1 (u - t), u + D(u) = q       (template -> world, Newton inversion)

A, t hold the global size / anisotropy / rotation / position of the subject; D is a smooth
displacement: a few broad Gaussian bumps (shape variation), local dilations centred on
organs (organ size variation) and an in-plane scaling of the body periphery only (body
habitus: thicker or thinner subcutaneous fat around the same organs). D is kept small enough that u -> u + D(u) stays strongly
monotone, hence invertible. Correspondence between two subjects is forward_b(backward_a(p)),
exact up to the Newton tolerance. Maps serialise to plain JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import DataError
from .template import TEMPLATE_VERSION, rotation, template_landmarks

MAPS_FILE = "phantom_maps.json"
MAPS_FORMAT = "alice3d-phantom-maps"

# organ centres (template mm) and Gaussian widths for the organ-size dilations
_ORGAN_DILATIONS = {
    "liver": ((70.0, 0.0, 62.0), 55.0),
    "spleen": ((-92.0, -36.0, 60.0), 32.0),
    "right_kidney": ((70.0, -46.0, -45.0), 30.0),
    "left_kidney": ((-68.0, -43.0, -28.0), 30.0),
    "stomach": ((-50.0, 25.0, 45.0), 34.0),
    "gallbladder": ((50.0, 46.0, 2.0), 18.0),
    "pancreas": ((-5.0, 18.0, -5.0), 28.0),
}


@dataclass
class SubjectMap:
    """World (RAS mm) <-> template (mm) map of one phantom subject; see module docstring."""

    A: np.ndarray  # (3, 3) world -> pre-template linear part
    t: np.ndarray  # (3,)
    bump_c: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (K, 3) centres
    bump_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) widths (mm)
    bump_a: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (K, 3) amplitudes (mm)
    dil_c: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (M, 3)
    dil_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (M,)
    dil_k: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (M,) relative size change
    fat_k: float = 0.0  # in-plane scaling of the periphery (> 0: thinner body wall)
    meta: dict = field(default_factory=dict)  # image/label paths, shape, affine, ...

    # -- displacement field on pre-template coordinates u (N, 3)
    def displacement(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        d = np.zeros_like(u)
        for c, s, a in zip(self.bump_c, self.bump_s, self.bump_a):
            g = np.exp(-((u - c) ** 2).sum(-1) / (2 * s * s))
            d += g[:, None] * a[None, :]
        for c, s, k in zip(self.dil_c, self.dil_s, self.dil_k):
            r = u - c
            g = np.exp(-(r**2).sum(-1) / (2 * s * s))
            d += (k * g)[:, None] * r
        if self.fat_k:
            w, _ = _periphery(u)
            d[:, :2] += (self.fat_k * w)[:, None] * u[:, :2]
        return d

    def jacobian(self, u: np.ndarray) -> np.ndarray:
        """(N, 3, 3) derivative of the displacement w.r.t. u."""
        u = np.asarray(u, dtype=np.float64)
        jac = np.zeros(u.shape[:1] + (3, 3))
        eye = np.eye(3)
        for c, s, a in zip(self.bump_c, self.bump_s, self.bump_a):
            r = u - c
            g = np.exp(-(r**2).sum(-1) / (2 * s * s))
            jac += -(g / (s * s))[:, None, None] * a[None, :, None] * r[:, None, :]
        for c, s, k in zip(self.dil_c, self.dil_s, self.dil_k):
            r = u - c
            g = np.exp(-(r**2).sum(-1) / (2 * s * s))
            jac += (k * g)[:, None, None] * (eye[None] - r[:, :, None] * r[:, None, :] / (s * s))
        if self.fat_k:
            w, grad = _periphery(u)
            jac[:, :2, :2] += self.fat_k * (w[:, None, None] * eye[None, :2, :2] + u[:, :2, None] * grad[:, None, :])
        return jac

    # -- maps
    def world_to_u(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, dtype=np.float64) @ self.A.T + self.t

    def u_to_world(self, u: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.A, (np.asarray(u, dtype=np.float64) - self.t).T).T

    def backward(self, p: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> template points (N, 3)."""
        p = np.atleast_2d(np.asarray(p, dtype=np.float64))
        u = self.world_to_u(p)
        return u + self.displacement(u)

    def forward(self, q: np.ndarray, tol: float = 1e-6, max_iter: int = 50) -> np.ndarray:
        """Template points (N, 3) -> world points (N, 3), by Newton on u + D(u) = q."""
        q = np.atleast_2d(np.asarray(q, dtype=np.float64))
        u = q - self.displacement(q)
        for _ in range(max_iter):
            res = u + self.displacement(u) - q
            if np.abs(res).max(initial=0.0) < tol:
                break
            jac = np.eye(3)[None] + self.jacobian(u)
            u = u - np.linalg.solve(jac, res[..., None])[..., 0]
        return self.u_to_world(u)

    # -- JSON
    def to_dict(self) -> dict:
        out = {k: np.asarray(getattr(self, k)).tolist() for k in _ARRAY_KEYS}
        out["fat_k"] = float(self.fat_k)
        out.update(self.meta)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SubjectMap":
        arrays = {}
        for k in _ARRAY_KEYS:
            a = np.asarray(d[k], dtype=np.float64)
            if k in ("bump_c", "bump_a", "dil_c"):
                a = a.reshape(-1, 3)
            arrays[k] = a
        meta = {k: v for k, v in d.items() if k not in _ARRAY_KEYS and k != "fat_k"}
        return cls(**arrays, fat_k=float(d.get("fat_k", 0.0)), meta=meta)


_ARRAY_KEYS = ("A", "t", "bump_c", "bump_s", "bump_a", "dil_c", "dil_s", "dil_k")
_BODY_AXES = (165.0, 105.0)  # in-plane half axes of the template body (mm)
_PERIPHERY = (0.55, 1.0)  # normalised body radius where the habitus scaling ramps from 0 to 1


def _periphery(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smoothstep weight (N,) of the body periphery and its gradient (N, 2) w.r.t. (u_x, u_y)."""
    a, b = _BODY_AXES
    rho = np.sqrt((u[:, 0] / a) ** 2 + (u[:, 1] / b) ** 2)
    lo, hi = _PERIPHERY
    t = np.clip((rho - lo) / (hi - lo), 0.0, 1.0)
    w = t * t * (3.0 - 2.0 * t)
    dw = 6.0 * t * (1.0 - t) / (hi - lo)
    safe = np.maximum(rho, 1e-9)
    grad = np.stack([u[:, 0] / (a * a * safe), u[:, 1] / (b * b * safe)], -1) * dw[:, None]
    return w, grad


def correspond(subject_a: SubjectMap, subject_b: SubjectMap, points_world_a: np.ndarray) -> np.ndarray:
    """Points (N, 3) in subject A's world (mm) -> the same anatomy in subject B's world (N, 3)."""
    return subject_b.forward(subject_a.backward(points_world_a))


def min_monotonicity(m: SubjectMap, lo=(-170.0, -100.0, -264.0), hi=(170.0, 118.0, 228.0), n: int = 14) -> float:
    """Smallest eigenvalue of the symmetric part of I + dD/du over a grid (invertible if > 0)."""
    axes = [np.linspace(lo[k], hi[k], n) for k in range(3)]
    u = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    # add points at and around the deformation centres, where the derivatives peak
    extra = [m.bump_c, m.dil_c]
    for c, s in ((m.bump_c, m.bump_s), (m.dil_c, m.dil_s)):
        for ci, si in zip(c, s):
            for f in (0.0, 1.0, 1.73):
                for d in np.eye(3):
                    extra.append((ci + f * si * d)[None])
                    extra.append((ci - f * si * d)[None])
    u = np.concatenate([u] + [np.asarray(e).reshape(-1, 3) for e in extra])
    jac = np.eye(3)[None] + m.jacobian(u)
    sym = 0.5 * (jac + np.transpose(jac, (0, 2, 1)))
    return float(np.linalg.eigvalsh(sym)[:, 0].min())


def sample_subject_map(rng: np.random.Generator, deform: float = 1.0) -> SubjectMap:
    """A random subject: global size/anisotropy/rotation/position plus smooth local deformation."""
    s = rng.uniform(0.88, 1.12)
    scale = s * np.array([rng.uniform(0.95, 1.05), rng.uniform(0.9, 1.1), rng.uniform(0.93, 1.07)])
    rot = rotation(rx=rng.uniform(-3, 3), ry=rng.uniform(-3, 3), rz=rng.uniform(-5, 5))
    pos = np.array([rng.uniform(-15, 15), rng.uniform(-15, 15), rng.uniform(-300, 300)])
    lin = rot @ np.diag(scale)  # u -> world linear part
    A = np.linalg.inv(lin)
    t = -A @ pos

    k = 6
    bump_c = np.column_stack([rng.uniform(-130, 130, k), rng.uniform(-80, 90, k), rng.uniform(-230, 200, k)])
    bump_s = rng.uniform(45.0, 90.0, k)
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bump_a = dirs * rng.uniform(3.0, 10.0, k)[:, None] * deform
    names = list(_ORGAN_DILATIONS)
    dil_c = np.array([_ORGAN_DILATIONS[n][0] for n in names], dtype=np.float64)
    dil_s = np.array([_ORGAN_DILATIONS[n][1] for n in names], dtype=np.float64)
    dil_k = rng.uniform(-0.15, 0.15, len(names)) * deform
    fat_k = float(rng.uniform(-0.09, 0.07)) * deform
    m = SubjectMap(A=A, t=t, bump_c=bump_c, bump_s=bump_s, bump_a=bump_a, dil_c=dil_c, dil_s=dil_s, dil_k=dil_k,
                   fat_k=fat_k)
    while min_monotonicity(m) < 0.4:  # shrink until comfortably invertible
        m.bump_a = m.bump_a * 0.7
        m.dil_k = m.dil_k * 0.7
        m.fat_k = m.fat_k * 0.7
    return m


# ----------------------------------------------------------------------------- cohort files


def write_maps(path: str | os.PathLike, maps: dict[str, SubjectMap], **header) -> Path:
    """Write subject maps (and header fields, e.g. landmarks) as plain JSON."""
    doc = {
        "format": MAPS_FORMAT,
        "template_version": TEMPLATE_VERSION,
        "convention": "backward(p) = u + D(u), u = A p + t; world = RAS+ mm; template mm",
        "landmarks": {k: v.tolist() for k, v in template_landmarks().items()},
        **header,
        "subjects": {k: m.to_dict() for k, m in maps.items()},
    }
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_maps_file(path: str | os.PathLike) -> dict[str, SubjectMap]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no phantom map file (generate the cohort with alice3d-data phantoms)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e}") from None
    if doc.get("format") != MAPS_FORMAT:
        raise DataError(f"{path}: not a phantom map file (format {doc.get('format')!r}, expected {MAPS_FORMAT!r})")
    return {k: SubjectMap.from_dict(v) for k, v in doc["subjects"].items()}


def load_cohort_maps(directory: str | os.PathLike) -> dict[str, SubjectMap]:
    """Maps of a generated cohort keyed by case id ("img0001", ...), from DIR/phantom_maps.json."""
    p = Path(directory)
    return load_maps_file(p if p.is_file() else p / MAPS_FILE)


def case_id(path: str | os.PathLike) -> str:
    """Case id of an image path: file name without .nii.gz / .nii / other suffix."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def landmarks_in_subject(m: SubjectMap) -> dict[str, np.ndarray]:
    """Template landmarks mapped into the subject's world (mm)."""
    lm = template_landmarks()
    pts = m.forward(np.stack(list(lm.values())))
    return dict(zip(lm, pts))
