"""alice.intra_without_casa=pooled: the fair "without CASA" control compares token means per volume."""

import pytest
import torch

from alice3d.config import ConfigError
from alice3d.core.losses import negative_cosine
from alice3d.methods.alice import TINY, Alice, AliceConfig
from alice3d.methods.views import make_alice_views


def _model(nd, **kw):
    torch.manual_seed(0)
    size = (32, 32, 16) if nd == 3 else (32, 32)
    return Alice(AliceConfig(**{**TINY, "img_size": size, "spatial_dims": nd}, use_casa=False, **kw)).eval()


@pytest.mark.parametrize("nd", [2, 3])
def test_pooled_intra_term_is_the_cosine_of_token_means_within_each_volume(nd):
    model = _model(nd, intra_without_casa="pooled", w_inter=0.0)
    size = model.cfg.img_size
    g = torch.Generator().manual_seed(1)
    q, k = torch.rand(2, 1, *size, generator=g), torch.rand(2, 1, *size, generator=g)
    views = make_alice_views(q, k, model.encoder.num_tokens, 0.75, model.cfg.aug, torch.Generator().manual_seed(0))
    out = model.forward_views(views)
    with torch.no_grad():
        v = model.encoder(views.images, ids_keep=views.masking.ids_keep)
        h = model.online["head"](model.dec_proj(model.decoder(v, views.masking.ids_restore)[0]))
        y = model.target["head"](model.target["encoder"](views.augmented))
    b = q.shape[0]
    hm, ym = h.mean(1), y.mean(1)
    torch.testing.assert_close(out["loss_intra"], negative_cosine(hm[:b], ym[:b]) + negative_cosine(hm[b:], ym[b:]))
    # Unlike the token-by-token form, it does not change when the target tokens are reordered
    # (a flipped or rotated target view), which is what makes it a fair control for CASA.
    perm = torch.randperm(y.shape[1], generator=torch.Generator().manual_seed(2))
    assert negative_cosine(hm[:b], y[:b, perm].mean(1)).item() == pytest.approx(negative_cosine(hm[:b], ym[:b]).item(), abs=1e-6)
    assert negative_cosine(h[:b], y[:b, perm]).item() != pytest.approx(negative_cosine(h[:b], y[:b]).item(), abs=1e-4)


def test_pooled_form_trains_the_online_head_and_the_setting_is_checked():
    model = _model(3, intra_without_casa="pooled").train()
    g = torch.Generator().manual_seed(3)
    batch = {"q": torch.rand(2, 1, 32, 32, 16, generator=g), "k": torch.rand(2, 1, 32, 32, 16, generator=g)}
    loss = model(batch)
    loss["loss"].backward()
    assert all(p.grad is not None for p in model.online["head"].parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.target.parameters())
    with pytest.raises(ConfigError, match="alice.intra_without_casa"):
        AliceConfig(**TINY, intra_without_casa="mean").validate()
