"""C-MAE (token-wise InfoNCE between two masked views, EMA teacher) in 2D and 3D."""

import pytest
import torch

from alice3d.methods.cmae import CMAE, CMAEConfig
from helpers import TINY_VIT

SIZES = {2: (16, 16), 3: (8, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cmae(nd, seed=0, **kw):
    args = dict(encoder="vit_tiny", encoder_kwargs=dict(TINY_VIT), img_size=SIZES[nd], patch_size=4,
                spatial_dims=nd, proj_hidden_dim=32, proj_dim=16)
    args.update(kw)
    torch.manual_seed(seed)
    return CMAE(CMAEConfig(**args))


def tiny_batch(nd, b=4, seed=1):
    return {"image": torch.rand(b, 1, *SIZES[nd], generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("nd", [2, 3])
def test_a_tiny_run_lowers_the_loss(nd):
    model, batch = tiny_cmae(nd), tiny_batch(nd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def loss():
        torch.manual_seed(5)
        return model(batch)

    with torch.no_grad():
        first = loss()
    assert set(first) == {"loss", "loss_con", "token_acc", "online_std", "target_std", "online_erank", "target_erank"}
    for step in range(15):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
        model.update_target(step + 1, 15)
    with torch.no_grad():
        last = loss()
    assert float(last["loss"]) < float(first["loss"]) - 0.5
    assert float(last["token_acc"]) > float(first["token_acc"])


def test_teacher_gets_no_gradient_and_follows_the_ema():
    model, batch = tiny_cmae(2), tiny_batch(2)
    torch.manual_seed(5)
    model(batch)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert model.online.mask_token.grad is not None and model.online.mask_token.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target.parameters()]
    model.update_target(0, 100)  # momentum 0.996 at step 0
    assert model.momentum == pytest.approx(0.996)
    for a, b in zip(before, model.target.parameters()):
        torch.testing.assert_close(b, a + 0.004, atol=1e-5, rtol=0)
    model.update_target(100, 100)
    assert model.momentum == pytest.approx(1.0)


def test_mask_token_replaces_only_masked_patches():
    model = tiny_cmae(3).eval()
    x = tiny_batch(3, b=2)["image"]
    mask = torch.zeros(2, model.encoder.num_tokens, dtype=torch.bool)
    mask[:, :3] = True
    x2 = x.clone()
    x2[:, :, :4, :4, :4] = torch.rand(2, 1, 4, 4, 4)  # patch 0 (masked) changes
    with torch.no_grad():
        a, b = model.online(x, mask), model.online(x2, mask)
        c = model.online(x2, torch.zeros_like(mask))
    assert a.shape == (2, model.encoder.num_tokens, 16)
    torch.testing.assert_close(a, b)  # what is under the mask token is invisible
    assert not torch.allclose(a, c)


def test_loss_tokens_subsamples_and_preview():
    model = tiny_cmae(2, loss_tokens=5)
    out = model(tiny_batch(2))
    assert torch.isfinite(out["loss"])
    panels = model.eval().preview(tiny_batch(2))
    assert set(panels) == {"input", "view1_masked", "view2_masked", "token_cosine"}
    assert all(p.shape == SIZES[2] for p in panels.values())
    state, meta = model.encoder_state()
    assert meta["method"] == "cmae" and not any(k.startswith("online") for k in state)
