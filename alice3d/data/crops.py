"""Random crops from the run's volumes (in memory or in a volume store), indexed by sample
(deterministic in the index).

A store case can be damaged inside a shard of the right size (a flipped bit): only a crop that
reads the damaged chunk finds it (by its checksum). The crop datasets then apply the case's
``on_bad_read`` (``data.on_bad_data``): ``skip`` quarantines the case for the rest of this
process (one warning naming it and the ``--verify`` fix) and draws the sample again from a
generator that is a function of the sample's seed only, ``fail`` stops the run.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from alice3d.data.sources import as_sources, crop_at
from alice3d.errors import DataError

__all__ = ["BodyCentres", "RandomCropDataset", "Redraw", "crop_at", "guarded_read", "is_quarantined",
           "quarantined", "redraw_generator", "MAX_REDRAWS"]

log = logging.getLogger("alice3d.data")
T = TypeVar("T")

# Redraws of one sample before giving up. With k damaged cases of n, a redraw hits one with
# probability k/n, so 64 misses in a row only happen when nearly the whole cohort is damaged.
MAX_REDRAWS = 64

_QUARANTINED: dict[tuple[str, str], str] = {}  # (store root, case) -> why; per process


def _key(src) -> tuple[str, str]:
    return str(getattr(src, "root", "")), str(getattr(src, "name", id(src)))


def is_quarantined(src) -> bool:
    """Whether ``src`` was found damaged in this process and is to be left out (only under
    ``on_bad_read="skip"``: a later run in the same process that asks for ``fail`` reads it again)."""
    return getattr(src, "on_bad_read", "") == "skip" and _key(src) in _QUARANTINED


def quarantined() -> dict[tuple[str, str], str]:
    """The cases this process quarantined: ``{(store root, case): reason}``."""
    return dict(_QUARANTINED)


class Redraw(Exception):
    """A read of a case failed under ``on_bad_read="skip"``; the case is quarantined, draw again."""


def guarded_read(src, read: Callable[[], T]) -> T:
    """``read()`` of crop source ``src``, applying its ``on_bad_read`` to a DataError (a damaged store
    entry): ``skip`` quarantines ``src`` and raises :class:`Redraw`; ``fail`` re-raises, saying so."""
    try:
        return read()
    except DataError as e:
        policy = getattr(src, "on_bad_read", "")
        if policy == "skip":
            key = _key(src)
            if key not in _QUARANTINED:
                _QUARANTINED[key] = str(e)
                log.warning("case %s is damaged; it is left out of the rest of this run (data.on_bad_data=skip): %s",
                            key[1], e)
            raise Redraw(key[1]) from None
        if policy == "fail":
            raise type(e)(f"{e}. The run stopped (data.on_bad_data=fail; with data.on_bad_data=skip it leaves a "
                          "damaged case out and goes on)") from None
        raise


def redraw_generator(start_state: dict, attempt: int) -> np.random.Generator:
    """The generator of redraw ``attempt`` (1, 2, ...) of a sample whose own generator started in
    ``start_state`` (its ``bit_generator.state``): a function of the sample's seed only, so a run
    redraws a sample the same way whenever (and in whichever process) it finds the damaged case."""
    words = np.frombuffer(hashlib.sha256(repr(start_state).encode()).digest(), dtype=np.uint32)
    return np.random.default_rng([*words.tolist(), int(attempt)])


def no_readable_volumes(sources: Sequence, need: int) -> DataError:
    bad = [s for s in sources if is_quarantined(s)]
    names = ", ".join(str(getattr(s, "name", "?")) for s in bad[:10]) + (" ..." if len(bad) > 10 else "")
    return DataError(
        f"{len(bad)} of the run's {len(sources)} volumes were found damaged while training ({names}); fewer than "
        f"{need} readable volume(s) left to draw from. Rebuild the store's damaged cases with "
        "`alice3d-data preprocess --data ... --out STORE --verify`")


class BodyCentres:
    """``centres[j]``: the (K, 3) body voxels of source ``j``, read when first asked for (a store
    volume keeps its sample on disk, so a large cohort costs nothing up front)."""

    def __init__(self, sources: Sequence):
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.sources[j].body_voxels()


class RandomCropDataset(Dataset):
    """Sample ``i``: a crop of ``crop_size`` from volume ``i % n`` at a random body position.

    ``volumes``: windowed in-memory ``Volume`` objects or crop sources (:mod:`alice3d.data.sources`).
    Centres are drawn among voxels brighter than ``body_threshold`` (inside the body; a store
    volume brings its own body sample) so crops do not waste compute on air; borders are padded
    with 0, the background value of the [0, 1] windowed intensities. A sample whose volume is
    quarantined (found damaged, ``on_bad_read="skip"``) is drawn again: volume and centre from the
    generator ``(seed, i, attempt)``.
    """

    def __init__(self, volumes: Sequence, crop_size: Sequence[int], seed: int = 0,
                 body_threshold: float = 0.05, key: str = "image"):
        if not volumes:
            raise ValueError("RandomCropDataset needs at least one volume")
        self.volumes = as_sources(volumes, body_threshold, 4096, seed, pad_value=0.0)
        self.crop, self.seed, self.key = tuple(int(c) for c in crop_size), seed, key
        self.centres = BodyCentres(self.volumes)

    def __len__(self) -> int:
        return 2**62

    def _crop(self, j: int, rng: np.random.Generator) -> np.ndarray:
        centres = self.centres[j]
        c = centres[rng.integers(len(centres))]
        return self.volumes[j].read_crop(c, self.crop)

    def __getitem__(self, i: int) -> dict:
        """``{key: (1, *crop_size)}`` float32 in [0, 1]."""
        n = len(self.volumes)
        for attempt in range(MAX_REDRAWS + 1):
            if attempt == 0:
                rng = np.random.default_rng((self.seed, int(i)))
                j = int(i) % n
            else:
                rng = np.random.default_rng((self.seed, int(i), attempt))
                j = int(rng.integers(n))
            src = self.volumes[j]
            if is_quarantined(src):
                continue
            try:
                crop = guarded_read(src, lambda: self._crop(j, rng))
            except Redraw:
                if all(is_quarantined(v) for v in self.volumes):
                    raise no_readable_volumes(self.volumes, 1) from None
                continue
            return {self.key: torch.from_numpy(np.ascontiguousarray(crop))[None]}
        raise no_readable_volumes(self.volumes, 1)
