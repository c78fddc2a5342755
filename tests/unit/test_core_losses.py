import math

import pytest
import torch
import torch.nn.functional as F

from alice3d.core.losses import DINOLoss, info_nce, info_nce_logits, masked_mse, negative_cosine, normalize_patches

# ---- masked_mse ---------------------------------------------------------------------------


def test_masked_mse_hand_value_raw_pixels():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[0.0, 0.0], [2.0, 2.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    # masked token MSEs: (1+4)/2 = 2.5, (1+1)/2 = 1, (4+4)/2 = 4; mean over the 3 masked tokens
    loss = masked_mse(pred, target, mask, norm_pix=False)
    torch.testing.assert_close(loss, torch.tensor((2.5 + 1.0 + 4.0) / 3))


def test_masked_mse_hand_value_norm_pix_uses_unbiased_var():
    pred = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 3.0]]])  # mean 2, unbiased var 2 -> (-1, 1) / sqrt(2 + eps)
    loss = masked_mse(pred, target, torch.tensor([[True]]))
    torch.testing.assert_close(loss, torch.tensor(1.0 / (2.0 + 1e-6)))
    torch.testing.assert_close(
        normalize_patches(target), torch.tensor([[[-1.0, 1.0]]]) / math.sqrt(2.0 + 1e-6)
    )


def test_masked_mse_gradient_zero_on_visible_and_analytic_on_masked():
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, False, True]])
    masked_mse(pred, target, mask).backward()
    assert torch.all(pred.grad[~mask] == 0)
    expected = 2 * (pred.detach() - normalize_patches(target)) / 4 / mask.sum()
    torch.testing.assert_close(pred.grad[mask], expected[mask])
    assert torch.autograd.gradcheck(lambda p: masked_mse(p, target, mask), (pred,))


def test_masked_mse_empty_mask_and_bad_shapes():
    pred = torch.randn(1, 3, 4, requires_grad=True)
    loss = masked_mse(pred, torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        masked_mse(pred, pred, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        masked_mse(torch.zeros(1, 3, 1), torch.zeros(1, 3, 1), torch.ones(1, 3, dtype=torch.bool))


def test_masked_mse_half_precision_returns_float32():
    pred = torch.randn(2, 3, 8).bfloat16()
    loss = masked_mse(pred, torch.randn(2, 3, 8).bfloat16(), torch.ones(2, 3, dtype=torch.bool))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- negative_cosine ----------------------------------------------------------------------


def test_negative_cosine_hand_value_and_stop_grad():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 1.0], [0.0, -3.0]], requires_grad=True)
    loss = negative_cosine(p, z)
    torch.testing.assert_close(loss, torch.tensor(-(1 / math.sqrt(2) - 1.0) / 2))
    loss.backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_negative_cosine_tokens_and_gradcheck():
    torch.manual_seed(0)
    p = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    expected = -F.cosine_similarity(p, z, dim=-1).mean()
    torch.testing.assert_close(negative_cosine(p, z), expected)
    assert torch.autograd.gradcheck(lambda a: negative_cosine(a, z), (p,))


# ---- info_nce -----------------------------------------------------------------------------


def test_info_nce_hand_values_2x2():
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised to the identity
    k = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    # logits [[2, 0], [0, 2]] at T = 0.5 -> -log(e^2 / (e^2 + 1)) per row
    torch.testing.assert_close(info_nce(q, k, temperature=0.5), torch.tensor(math.log1p(math.exp(-2.0))))
    k_same = torch.tensor([[1.0, 0.0], [4.0, 0.0]])  # row 0 logits [2, 2], row 1 logits [0, 0]
    torch.testing.assert_close(info_nce(q, k_same, temperature=0.5), torch.tensor(math.log(2.0)))


def test_info_nce_gradcheck_flattens_tokens_and_gather_is_noop_without_dist():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.3), (q, k))
    flat = info_nce(q.reshape(6, 4), k.reshape(6, 4), 0.3)
    torch.testing.assert_close(info_nce(q, k, 0.3), flat)
    torch.testing.assert_close(info_nce(q, k, 0.3, gather=True), flat)


def test_info_nce_logits_hand_value_masked_slots_and_empty_rows():
    pos = torch.tensor([[1.0], [0.5]])
    neg = torch.tensor([[0.0, -1.0], [0.5, 2.0]])
    valid = torch.tensor([[True, True], [True, False]])
    # T = 0.5: row 0 logits 2 | 0, -2; row 1 logits 1 | 1 (the 2.0 slot is empty)
    row0 = math.log(math.exp(2) + 1 + math.exp(-2)) - 2
    row1 = math.log(2 * math.e) - 1
    torch.testing.assert_close(info_nce_logits(pos, neg, 0.5, valid), torch.tensor((row0 + row1) / 2))
    # a row without any negative costs nothing (log(e^p / e^p) = 0)
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert info_nce_logits(pos, neg, 0.5, none).item() == 0.0
    with pytest.raises(ValueError, match="pos \\(N, 1\\)"):
        info_nce_logits(pos[:, 0], neg, 0.5)
    with pytest.raises(ValueError, match="neg_valid"):
        info_nce_logits(pos, neg, 0.5, valid[:, :1])


def test_info_nce_per_row_negatives_equal_the_batch_form_when_they_are_the_other_rows():
    torch.manual_seed(0)
    q = torch.randn(4, 5, dtype=torch.float64)
    k = torch.randn(4, 5, dtype=torch.float64)
    others = torch.stack([k[[j for j in range(4) if j != i]] for i in range(4)])  # (4, 3, 5)
    # the unnormalised slots are normalised like q and k
    torch.testing.assert_close(info_nce(q, k, 0.3, negatives=3.0 * others), info_nce(q, k, 0.3))
    # a slot marked empty is as if it were not there
    padded = torch.cat([others, torch.randn(4, 1, 5, dtype=torch.float64)], dim=1)
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[:, 3] = False
    torch.testing.assert_close(info_nce(q, k, 0.3, negatives=padded, neg_valid=valid), info_nce(q, k, 0.3))


def test_info_nce_without_normalising_uses_raw_dot_products():
    q = torch.tensor([[2.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[[0.0, 3.0], [1.0, 0.0]]])
    # T = 1, raw: pos 2, negatives 0 and 2 -> log(e^2 + 1 + e^2) - 2; normalised: pos 1, negatives 0 and 1
    torch.testing.assert_close(info_nce(q, k, 1.0, negatives=n, normalize=False),
                               torch.tensor(math.log(2 * math.exp(2) + 1) - 2))
    torch.testing.assert_close(info_nce(q, k, 1.0, negatives=n), torch.tensor(math.log(2 * math.e + 1) - 1))


def test_info_nce_per_row_negatives_refuse_bad_combinations():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="\\(N, K, D\\)"):
        info_nce(q, q, negatives=torch.randn(3, 4))
    with pytest.raises(ValueError, match="gather or self_negatives"):
        info_nce(q, q, negatives=torch.randn(3, 2, 4), self_negatives=True)
    with pytest.raises(ValueError, match="neg_valid needs negatives"):
        info_nce(q, q, neg_valid=torch.ones(3, 2, dtype=torch.bool))


def test_info_nce_per_row_negatives_half_precision_returns_float32():
    q, k, n = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16(), torch.randn(3, 2, 4).bfloat16()
    loss = info_nce(q, k, 0.5, negatives=n)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- DINOLoss -----------------------------------------------------------------------------


def test_dino_loss_hand_value_and_center_update():
    loss_fn = DINOLoss(2, student_temp=1.0, teacher_temp=1.0, center_momentum=0.9)
    teacher = torch.tensor([[0.0, math.log(2.0)]])  # softmax -> (1/3, 2/3)
    student = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # log_softmax -> log(1/4), log(3/4)
    loss = loss_fn(student, teacher)
    torch.testing.assert_close(loss, torch.tensor(-(math.log(0.25) / 3 + 2 * math.log(0.75) / 3)))
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher)
    # The second call centres with the old centre, then updates it again.
    loss2 = loss_fn(student, teacher)
    q = F.softmax(teacher - 0.1 * teacher, dim=-1)
    torch.testing.assert_close(loss2, -(q * F.log_softmax(student.detach(), dim=-1)).sum())
    torch.testing.assert_close(loss_fn.center, 0.9 * 0.1 * teacher + 0.1 * teacher)


def test_dino_center_is_batch_mean_over_tokens_and_eval_does_not_update():
    loss_fn = DINOLoss(3, center_momentum=0.5)
    teacher = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[0.0, 0.0, 6.0], [4.0, 0.0, 2.0]]])
    loss_fn(torch.zeros(2, 2, 3), teacher)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.0, 0.5, 1.5]]))  # 0.5 * (2, 1, 3)
    loss_fn.eval()
    loss_fn(torch.zeros(2, 2, 3), teacher * 10)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.0, 0.5, 1.5]]))


def test_dino_gradient_goes_to_student_only():
    torch.manual_seed(0)
    loss_fn = DINOLoss(5, student_temp=0.1, teacher_temp=0.04)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    loss_fn(s, t).backward()
    assert t.grad is None
    q = F.softmax(t.detach() / 0.04, dim=-1)  # centre was 0 at the time of the loss
    expected = (F.softmax(s.detach() / 0.1, dim=-1) - q) / 0.1 / 4
    torch.testing.assert_close(s.grad, expected)


def test_dino_teacher_temperature_warmup():
    loss_fn = DINOLoss(4, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_steps=10)
    assert loss_fn.teacher_temperature(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temperature(5) == pytest.approx(0.055)
    assert loss_fn.teacher_temperature(10) == pytest.approx(0.07)
    assert loss_fn.teacher_temperature(1000) == pytest.approx(0.07)
    assert DINOLoss(4, teacher_temp=0.07).teacher_temperature(0) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="out_dim=4"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3))
