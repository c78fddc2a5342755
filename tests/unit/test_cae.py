"""CAE in 2D and 3D: loss, regressor that never writes the visible tokens, stop-gradient target."""

import pytest
import torch

from alice3d.config import ConfigError
from alice3d.core.masking import gather_tokens, mask_to_image
from alice3d.methods.cae import CAE, CAEConfig, CrossAttentionBlock
from helpers import TINY_VIT

SIZES = {2: (16, 16), 3: (8, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cae(nd, seed=0, **kw):
    args = dict(encoder="vit_tiny", encoder_kwargs=dict(TINY_VIT), img_size=SIZES[nd], patch_size=4,
                spatial_dims=nd, decoder_dim=24, decoder_depth=1, decoder_heads=2, regressor_depth=2, min_block=2)
    args.update(kw)
    torch.manual_seed(seed)
    return CAE(CAEConfig(**args))


def tiny_batch(nd, b=4, seed=1):
    return {"image": torch.rand(b, 1, *SIZES[nd], generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("nd", [2, 3])
def test_a_tiny_run_lowers_the_loss(nd):
    model, batch = tiny_cae(nd), tiny_batch(nd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def loss():
        torch.manual_seed(5)
        return model(batch)

    with torch.no_grad():
        first = loss()
    assert set(first) == {"loss", "loss_rec", "loss_align", "online_std", "target_std", "online_erank", "target_erank"}
    torch.testing.assert_close(first["loss"], first["loss_rec"] + 2.0 * first["loss_align"])
    for step in range(15):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
        model.update_target(step + 1, 15)
    with torch.no_grad():
        last = loss()
    assert float(last["loss"]) < 0.7 * float(first["loss"])


@pytest.mark.parametrize("nd", [2, 3])
def test_regressor_reads_but_never_writes_the_visible_representations(nd):
    model, x = tiny_cae(nd), tiny_batch(nd)["image"]
    torch.manual_seed(3)
    masking = model.masking(x.shape[0], x.device)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, args, out: seen.append(args[1].detach().clone()))
             for blk in model.regressor.blocks]
    visible, regressed = model.regress(x, masking)
    for h in hooks:
        h.remove()
    n_keep = masking.num_keep
    assert regressed.shape == (x.shape[0], masking.num_masked, model.encoder.hidden_size)
    # Every block gets the encoder's visible tokens unchanged as its first keys/values.
    assert len(seen) == len(model.regressor.blocks)
    for kv in seen:
        torch.testing.assert_close(kv[:, :n_keep], visible.detach(), rtol=0, atol=0)
    # The visible representations do not depend on what is under the mask ...
    x2 = x.clone()
    hidden = mask_to_image(masking.mask, model.encoder.grid, model.encoder.patch_size).bool()
    x2[hidden] = torch.rand(int(hidden.sum()))
    visible2, regressed2 = model.regress(x2, masking)
    torch.testing.assert_close(visible2, visible)
    torch.testing.assert_close(regressed2, regressed)
    # ... and the regressor does use them (non-zero gradient through the keys/values).
    grad = torch.autograd.grad(regressed.sum(), visible, retain_graph=True)[0]
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_alignment_target_carries_no_gradient(momentum):
    model, x = tiny_cae(2, target_momentum=momentum), tiny_batch(2)["image"]
    torch.manual_seed(3)
    masking = model.masking(x.shape[0], x.device)
    target = model.alignment_target(x, masking)
    assert not target.requires_grad and target.grad_fn is None
    # The target is the encoder's representation of the masked patches.
    with torch.no_grad():
        direct = model.encoder(x, ids_keep=masking.ids_masked)
    torch.testing.assert_close(target, direct)
    # The alignment loss alone trains encoder + regressor through the visible branch only:
    # its encoder gradient equals the one with the target replaced by a constant copy.
    def align_grads(tgt):
        model.zero_grad()
        _, reg = model.regress(x, masking)
        torch.nn.functional.mse_loss(reg, tgt).backward()
        return [p.grad.clone() for p in model.encoder.parameters() if p.grad is not None]

    g1 = align_grads(model.alignment_target(x, masking))
    g2 = align_grads(direct.clone())
    assert g1 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    if momentum > 0:
        assert all(p.grad is None for p in model.target.parameters())
        before = [p.clone() for p in model.target.parameters()]
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(1.0)
        model.update_target(1, 10)
        moved = [torch.allclose(a + 0.1, b, atol=1e-5) for a, b in zip(before, model.target.parameters())
                 if a.is_floating_point()]
        assert all(moved)


def test_cross_attention_block_updates_queries_only_from_keys():
    torch.manual_seed(0)
    blk = CrossAttentionBlock(16, 4)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    out = blk(q, kv)
    assert out.shape == q.shape
    # Permuting the keys/values (with their positions) does not change the result.
    perm = torch.randperm(5)
    torch.testing.assert_close(blk(q, kv[:, perm]), out, atol=1e-5, rtol=1e-5)


def test_preview_and_export():
    model, batch = tiny_cae(3), tiny_batch(3)
    panels = model.eval().preview(batch)
    assert set(panels) == {"input", "masked", "reconstruction"}
    assert all(p.shape == SIZES[3] for p in panels.values())
    state, meta = model.encoder_state()
    assert meta["method"] == "cae" and "patch_embedding.position_embeddings" in state
    # Block masking masks exactly half the tokens.
    m = model.masking(3, "cpu")
    assert m.mask.sum(1).tolist() == [4, 4, 4]
    assert gather_tokens(m.mask[..., None].float(), m.ids_masked).all()


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="target_momentum"):
        CAEConfig(encoder="vit_tiny", img_size=(16, 16), spatial_dims=2, patch_size=4, target_momentum=1.5).validate()
