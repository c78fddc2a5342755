"""R-MAE (siamese MAE with the complementary view) in 2D and 3D."""

import pytest
import torch

from alice3d.config import ConfigError
from alice3d.core.losses import masked_mse
from alice3d.core.masking import random_masking
from alice3d.core.patches import patchify
from alice3d.methods.rmae import RMAE, RMAEConfig, complement
from helpers import TINY_VIT

SIZES = {2: (16, 16), 3: (8, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_rmae(nd, seed=0, **kw):
    args = dict(encoder="vit_tiny", encoder_kwargs=dict(TINY_VIT), img_size=SIZES[nd], patch_size=4,
                spatial_dims=nd, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    args.update(kw)
    torch.manual_seed(seed)
    return RMAE(RMAEConfig(**args))


def tiny_batch(nd, b=4, seed=1):
    return {"image": torch.rand(b, 1, *SIZES[nd], generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("nd", [2, 3])
def test_a_tiny_run_lowers_the_loss(nd):
    model, batch = tiny_rmae(nd), tiny_batch(nd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def loss():
        torch.manual_seed(5)
        return model(batch)

    with torch.no_grad():
        first = loss()
    assert set(first) == {"loss", "loss_match", "loss_ae", "loss_rec"}
    torch.testing.assert_close(first["loss"], first["loss_match"] + first["loss_ae"])
    for _ in range(15):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = loss()
    assert float(last["loss"]) < 0.7 * float(first["loss"])


def test_complement_swaps_visible_and_masked_sets():
    m = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    c = complement(m)
    assert torch.equal(c.mask, ~m.mask)
    assert torch.equal(c.ids_keep, m.ids_masked) and torch.equal(c.ids_masked, m.ids_keep)


def test_losses_are_the_siamese_match_and_the_autoencoding_term():
    model, batch = tiny_rmae(2, ae_weight=0.5).eval(), tiny_batch(2)
    torch.manual_seed(9)
    out = model(batch)
    torch.manual_seed(9)
    m = random_masking(4, model.encoder.num_tokens, 0.75)
    with torch.no_grad():
        pred = model.reconstruct(batch["image"], m)
        pred_c = model.reconstruct(batch["image"], complement(m), complementary=True)
    pix = patchify(batch["image"], 4)
    torch.testing.assert_close(out["loss_match"], masked_mse(pred, pred_c, m.mask, norm_pix=False))
    torch.testing.assert_close(out["loss_ae"], masked_mse(pred_c, pix, m.mask))
    torch.testing.assert_close(out["loss"].detach(), out["loss_match"] + 0.5 * out["loss_ae"])


def test_stop_gradient_target_branch():
    """Shared decoder: with the AE term off and a stop-gradient target, the complementary pass gets no gradient."""
    model, batch = tiny_rmae(2, ae_weight=0.0, decoders="shared", stop_grad_target=True), tiny_batch(2)
    grads = []
    hook = model.decoder.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[1]))
    torch.manual_seed(5)
    model(batch)["loss"].backward()
    hook.remove()
    # Two decoder passes; only the masked view's receives a non-zero gradient.
    assert len(grads) == 2 and sorted(bool(g.abs().sum() > 0) for g in grads) == [False, True]
    model_free = tiny_rmae(2, ae_weight=0.0, decoders="shared", stop_grad_target=False)
    grads.clear()
    hook = model_free.decoder.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[1]))
    torch.manual_seed(5)
    model_free(batch)["loss"].backward()
    hook.remove()
    assert len(grads) == 2 and all(bool(g.abs().sum() > 0) for g in grads)


def test_preview_shows_both_views():
    panels = tiny_rmae(3).eval().preview(tiny_batch(3))
    assert {"input", "masked", "reconstruction", "complement_masked", "complement_reconstruction"} == set(panels)
    # The two masked inputs hide complementary patches: together they show the whole input.
    torch.testing.assert_close(torch.from_numpy(panels["masked"] + panels["complement_masked"]),
                               torch.from_numpy(panels["input"]))


def test_eq8_two_decoders_are_optimised_jointly():
    model, batch = tiny_rmae(2, ae_weight=0.0), tiny_batch(2)
    assert model.decoder_comp is not None and model.cfg.decoders == "two" and not model.cfg.stop_grad_target
    torch.manual_seed(5)
    model(batch)["loss"].backward()
    # The match term alone trains phi, phi' and the encoder.
    for name, module in (("phi", model.decoder), ("phi'", model.decoder_comp), ("encoder", model.encoder)):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    # With the AE term on, every trainable parameter has a gradient (DDP without unused parameters).
    model2 = tiny_rmae(2)
    torch.manual_seed(5)
    model2(batch)["loss"].backward()
    assert all(p.grad is not None for p in model2.parameters() if p.requires_grad)


def test_eq8_with_equal_decoders_is_the_shared_joint_form():
    """Invariant: phi' = phi gives exactly the loss of one shared decoder without stop-gradient."""
    two, batch = tiny_rmae(3), tiny_batch(3)
    shared = tiny_rmae(3, decoders="shared", stop_grad_target=False)
    shared.encoder.load_state_dict(two.encoder.state_dict())
    shared.decoder.load_state_dict(two.decoder.state_dict())
    two.decoder_comp.load_state_dict(two.decoder.state_dict())
    torch.manual_seed(3)
    a = two(batch)
    torch.manual_seed(3)
    b = shared(batch)
    for key in ("loss", "loss_match", "loss_ae", "loss_rec"):
        torch.testing.assert_close(a[key].detach(), b[key].detach(), msg=key)
    # Different phi' weights change the loss (phi' is really used for the complementary view).
    with torch.no_grad():
        for p in two.decoder_comp.parameters():
            p.add_(0.05)
    torch.manual_seed(3)
    assert not torch.allclose(two(batch)["loss_match"], a["loss_match"])


def test_bad_decoders_value_names_the_key():
    with pytest.raises(ConfigError, match="rmae.decoders"):
        tiny_rmae(2, decoders="three")
