"""The one affine helper: hand-computed values, batch shapes, numpy and torch, bad shapes."""

import nibabel as nib
import numpy as np
import pytest
import torch

from alice3d.data.geometry import apply_affine

# x' = -4 y + 10, y' = 3 x - 5, z' = 2 z + 1 (axes swapped, scaled, shifted)
AFFINE = np.array([[0.0, -4, 0, 10], [3, 0, 0, -5], [0, 0, 2, 1], [0, 0, 0, 1]])


def test_hand_computed_points():
    out = apply_affine(AFFINE, np.array([[1, 2, 3], [0, 0, 0]]))  # integer voxel indices
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[2.0, -2.0, 7.0], [10.0, -5.0, 1.0]])
    np.testing.assert_array_equal(apply_affine(AFFINE, [1, 2, 3]), [2.0, -2.0, 7.0])  # one point (3,)
    aff2 = np.array([[2.0, 0, 1], [0, -1, 4], [0, 0, 1]])  # 2-D: (3, 3) affine, (N, 2) points
    np.testing.assert_array_equal(apply_affine(aff2, [[1.0, 1.0]]), [[3.0, 3.0]])


def test_batch_shapes_keep_their_leading_axes():
    pts = np.random.default_rng(0).normal(size=(2, 5, 4, 3))
    out = apply_affine(AFFINE, pts)
    assert out.shape == (2, 5, 4, 3)
    np.testing.assert_allclose(out.reshape(-1, 3), apply_affine(AFFINE, pts.reshape(-1, 3)))
    np.testing.assert_allclose(out, nib.affines.apply_affine(AFFINE, pts))  # nibabel agrees
    np.testing.assert_allclose(apply_affine(np.linalg.inv(AFFINE), out), pts, atol=1e-12)
    assert apply_affine(AFFINE, np.zeros((0, 3))).shape == (0, 3)


def test_torch_points_keep_dtype_device_and_gradients():
    pts = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    aff = torch.tensor(AFFINE, dtype=torch.float32, requires_grad=True)
    out = apply_affine(aff, pts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 7.0]]))
    out.sum().backward()
    torch.testing.assert_close(pts.grad, torch.tensor([[3.0, -4.0, 2.0]]))  # column sums of the linear part
    torch.testing.assert_close(aff.grad[:3, 3], torch.ones(3))
    grid = apply_affine(AFFINE, torch.zeros(4, 4, 3, dtype=torch.float64))  # numpy affine, tensor points
    assert isinstance(grid, torch.Tensor) and grid.shape == (4, 4, 3) and grid.dtype == torch.float64
    torch.testing.assert_close(grid[0, 0], torch.tensor([10.0, -5.0, 1.0], dtype=torch.float64))


def test_affine_of_the_wrong_size_is_an_error():
    with pytest.raises(ValueError, match=r"points with 2 coordinates need a \(3, 3\) affine, got shape \(4, 4\)"):
        apply_affine(AFFINE, np.zeros((5, 2)))
