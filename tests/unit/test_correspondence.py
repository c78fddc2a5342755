"""Cross-patient retrieval (alice3d.analysis.correspondence) and the partial-label organ probe task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alice3d.analysis.correspondence import retrieval_scores, retrieval_task
from alice3d.analysis.probing import knn_probe, organ_center_task
from alice3d.data.io import Volume


class RawVoxels(torch.nn.Module):
    """The crop itself as the feature: one token holding every voxel (cosine 1 only for an identical crop)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # frozen_tokens reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, None, :]


def _volume(image: np.ndarray, centres: dict[int, tuple[int, int, int]]) -> Volume:
    label = np.zeros(image.shape, np.int16)
    for lab, (i, j, k) in centres.items():
        label[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = lab
    return Volume(array=image, affine=np.eye(4), path=f"vol{len(centres)}", label=label)


@pytest.fixture
def image():
    return np.random.default_rng(0).random((24, 24, 64)).astype(np.float32)  # no two z-shifts look alike


def test_identical_anatomy_is_retrieved_at_offset_zero(image):
    a = _volume(image, {1: (12, 12, 30), 2: (8, 16, 40)})
    b = _volume(image.copy(), {1: (12, 12, 30), 2: (8, 16, 40)})
    task = retrieval_task([a, b], (8, 8, 8), {"one": 1, "two": 2}, n_candidates=6, step=2, spacing_mm=2.5)
    assert task.candidates.shape == (4, 6, 1, 8, 8, 8) and task.true_index == 3
    res = retrieval_scores(RawVoxels(), task)
    assert res["top1_mean"] == 1.0 and res["error_mm_mean"] == 0.0
    assert np.isnan(res["top1"][0, 0]).all()  # a patient is never its own reference
    assert res["per_organ_top1"] == {"one": 1.0, "two": 1.0}


def test_a_label_two_steps_off_the_anatomy_costs_top1_and_gives_the_mm_error(image):
    # B's contour of organ 1 sits 2 candidate steps (2 x 2 voxels) higher than the anatomy A's contour
    # marks, so the best match is candidate k = -2: wrong, 2 * 2 voxels * 2.5 mm = 10 mm off.
    a = _volume(image, {1: (12, 12, 30)})
    b = _volume(image.copy(), {1: (12, 12, 34)})
    task = retrieval_task([a, b], (8, 8, 8), {"one": 1}, n_candidates=6, step=2, spacing_mm=2.5)
    res = retrieval_scores(RawVoxels(), task)
    assert res["top1"][0, 1, 0] == 0.0 and res["error_mm"][0, 1, 0] == pytest.approx(10.0)
    assert res["top1"][1, 0, 0] == 0.0 and res["error_mm"][1, 0, 0] == pytest.approx(10.0)


def test_organs_a_patient_does_not_contour_make_no_query(image):
    a = _volume(image, {1: (12, 12, 30), 2: (8, 16, 40)})
    b = _volume(image.copy(), {1: (12, 12, 30), 2: (8, 16, 40)})
    task = retrieval_task([a, b], (8, 8, 8), {"one": 1, "two": 2}, contoured=[[1, 2], [1]], n_candidates=4)
    assert sorted(map(tuple, task.query_of.tolist())) == [(0, 0), (0, 1), (1, 0)]
    res = retrieval_scores(RawVoxels(), task)
    assert np.isnan(res["top1"][0, 1, 1]) and res["top1"][0, 1, 0] == 1.0


def test_partial_label_probe_task_skips_uncontoured_classes_and_records_subjects(image):
    vols = [_volume(image, {1: (12, 12, 30), 2: (8, 16, 40)}) for _ in range(4)]
    task = organ_center_task(vols, (8, 8, 8), classes={"one": (1,), "two": (2,)}, per_class=27,
                             contoured=[[1, 2], [1], [1, 2], [2]], other=False, train_fraction=0.5)
    assert task.class_names == ["one", "two"]
    counts = {j: torch.bincount(task.labels[task.subjects == j], minlength=2).tolist() for j in range(4)}
    assert counts == {0: [27, 27], 1: [27, 0], 2: [27, 27], 3: [0, 27]}  # every voxel of each 3^3 organ
    assert task.train.tolist() == (task.subjects < 2).tolist()
    # identical subjects, every voxel drawn: each test crop has an identical training crop, so 1-NN is always right
    tokens = task.images.flatten(1)[:, None, :]
    res = knn_probe(tokens, task, k=1)
    assert res.test_acc == 1.0 and res.test_correct.shape == (int((~task.train).sum()),) and bool(res.test_correct.all())
