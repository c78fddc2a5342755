"""Alice: losses, gradient flow, EMA, cross-volume pairing, CASA, ablations, 2D/3D."""

import dataclasses

import pytest
import torch
from monai.networks.nets import UNETR

from alice3d.config import ConfigError
from alice3d.core.diagnostics import feature_spread
from alice3d.core.ema import cosine_momentum, scaled_momentum_base
from alice3d.core.losses import negative_cosine
from alice3d.methods.alice import Alice, AliceConfig
from alice3d.methods.views import make_alice_views
from helpers import TINY_VIT, TINY_VIT_WIDTH

SIZES = {3: ((32, 32, 16), 8), 2: ((32, 32), 8)}


def tiny_cfg(nd=3, **kw):
    size, patch = SIZES[nd]
    args = dict(
        encoder="vit_tiny",
        encoder_kwargs=dict(TINY_VIT),
        img_size=size,
        patch_size=patch,
        spatial_dims=nd,
        decoder_dim=24,
        decoder_depth=1,
        decoder_heads=2,
        head_out_dim=32,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
    )
    args.update(kw)
    return AliceConfig(**args)


def tiny_model(nd=3, seed=0, **kw):
    torch.manual_seed(seed)
    return Alice(tiny_cfg(nd, **kw))


def tiny_batch(nd=3, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = SIZES[nd][0]
    return {"q": torch.rand(b, 1, *size, generator=g), "k": torch.rand(b, 1, *size, generator=g)}


@torch.no_grad()
def heads_by_hand(model, views):
    """Encoded visible tokens, student head on the decoded masked views, teacher head on the intact views."""
    v = model.encoder(views.images, ids_keep=views.masking.ids_keep)
    h = model.online["head"](model.dec_proj(model.decoder(v, views.masking.ids_restore)[0]))
    return v, h, model.target["head"](model.target["encoder"](views.augmented))


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("nd", [2, 3])
def test_loss_dict_and_total(nd):
    model = tiny_model(nd)
    out = model(tiny_batch(nd))
    for key in ("loss", "loss_rec", "loss_inter", "loss_intra", "rec_q", "rec_k", "inter_cos", "intra_cos"):
        assert key in out and out[key].ndim == 0 and torch.isfinite(out[key]), key
    assert out["loss"].requires_grad
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")
    expected = out["loss_rec"] + out["loss_inter"] + out["loss_intra"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(out["loss_rec"], out["rec_q"] + out["rec_k"])


def test_gradients_reach_online_modules_but_never_the_target():
    model = tiny_model(3)
    model(tiny_batch(3))["loss"].backward()
    for prefix in ("online.encoder.", "online.head.", "decoder.", "dec_proj.", "casa."):
        params = {n: p for n, p in trainable(model).items() if n.startswith(prefix)}
        assert params, prefix
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for p in params.values()), prefix
    assert trainable(model)["online.encoder.patch_embedding.position_embeddings"].grad.abs().sum() > 0
    target_params = list(model.target.parameters())
    assert target_params
    assert all(not p.requires_grad and p.grad is None for p in target_params)
    # Every trainable parameter has a gradient (DDP without find_unused_parameters).
    assert all(p.grad is not None for p in trainable(model).values())


def test_ema_moves_target_by_exactly_one_minus_m():
    model = tiny_model(3)
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before_t = {n: p.detach().clone() for n, p in model.target.named_parameters()}
    online = {n: p.detach().clone() for n, p in model.online.named_parameters()}
    assert any(not torch.equal(before_t[n], online[n]) for n in online)
    m = model.update_target(3, 10)
    assert m == pytest.approx(cosine_momentum(3, 10, 0.996, 1.0))
    for name, p in model.target.named_parameters():
        expected = before_t[name] + (1 - m) * (online[name] - before_t[name])
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7, msg=name)
    # Online weights are untouched by the EMA step.
    for name, p in model.online.named_parameters():
        torch.testing.assert_close(p, online[name], rtol=0, atol=0)


def _recorded_run(model, views):
    calls = []
    original = model.similarity

    def recorder(student, teacher, term):
        calls.append((term, student.detach().clone(), teacher.detach().clone()))
        return original(student, teacher, term)

    model.similarity = recorder
    out = model.forward_views(views)
    del model.similarity
    return out, calls


def test_inter_pairs_masked_query_with_intact_key_and_intra_stays_in_volume():
    model = tiny_model(3).eval()
    batch = tiny_batch(3)
    b = batch["q"].shape[0]
    views = make_alice_views(batch["q"], batch["k"], model.encoder.num_tokens, 0.75,
                             model.cfg.aug, torch.Generator().manual_seed(0))
    out, calls = _recorded_run(model, views)
    assert [c[0] for c in calls] == ["inter", "inter", "intra", "intra"]

    # Independent recomputation of the branch outputs.
    with torch.no_grad():
        v, h, y = heads_by_hand(model, views)
        cls_s, cls_t = h.mean(1), y.mean(1)
        s_casa, t_casa = model.casa(v, h), model.casa(v, y)

    (_, s0, t0), (_, s1, t1), (_, s2, t2), (_, s3, t3) = calls
    # Eq. 2: masked Q with intact K, masked K with intact Q.
    torch.testing.assert_close(s0, cls_s[:b])
    torch.testing.assert_close(t0, cls_t[b:])
    torch.testing.assert_close(s1, cls_s[b:])
    torch.testing.assert_close(t1, cls_t[:b])
    assert not torch.allclose(t0, cls_t[:b], atol=1e-4)
    # Eq. 5: S_u^Q with T_w^Q and S_r^K with T_v^K (CASA, same query for student and teacher).
    torch.testing.assert_close(s2, s_casa[:b])
    torch.testing.assert_close(t2, t_casa[:b])
    torch.testing.assert_close(s3, s_casa[b:])
    torch.testing.assert_close(t3, t_casa[b:])
    assert s2.shape == (b, views.masking.num_keep, 32)
    # The reported values are those of the right pairs, not of the same-volume ones.
    expected_inter = negative_cosine(cls_s[:b], cls_t[b:]) + negative_cosine(cls_s[b:], cls_t[:b])
    same_volume = negative_cosine(cls_s[:b], cls_t[:b]) + negative_cosine(cls_s[b:], cls_t[b:])
    torch.testing.assert_close(out["loss_inter"], expected_inter)
    assert not torch.allclose(expected_inter, same_volume, atol=1e-5)
    expected_intra = negative_cosine(s_casa[:b], t_casa[:b]) + negative_cosine(s_casa[b:], t_casa[b:])
    torch.testing.assert_close(out["loss_intra"], expected_intra)


def test_target_sees_intact_augmented_views():
    model = tiny_model(3).eval()
    batch = tiny_batch(3)
    views = make_alice_views(batch["q"], batch["k"], model.encoder.num_tokens, 0.75,
                             model.cfg.aug, torch.Generator().manual_seed(0))
    seen = []
    hook = model.target["encoder"].register_forward_hook(lambda mod, args, kwargs, out: seen.append((args, kwargs)),
                                                         with_kwargs=True)
    model.forward_views(views)
    hook.remove()
    (args, kwargs), = seen
    torch.testing.assert_close(args[0], views.augmented, rtol=0, atol=0)
    assert kwargs.get("ids_keep") is None and kwargs.get("mask") is None


@pytest.mark.parametrize("weight", ["w_rec", "w_inter", "w_intra"])
def test_zero_weight_removes_the_term(weight):
    model = tiny_model(3, **{weight: 0.0})
    out = model(tiny_batch(3))
    term = {"w_rec": "loss_rec", "w_inter": "loss_inter", "w_intra": "loss_intra"}[weight]
    assert float(out[term]) == 0.0
    others = [k for k in ("loss_rec", "loss_inter", "loss_intra") if k != term]
    torch.testing.assert_close(out["loss"].detach(), out[others[0]] + out[others[1]])
    assert all(float(out[k]) != 0.0 for k in others)
    out["loss"].backward()
    assert all(p.grad is not None for p in trainable(model).values())
    if weight == "w_intra":
        assert model.casa is None
    if weight == "w_rec":
        assert model.decoder.pred is None and "rec_q" not in out


def test_reconstruction_only_has_no_target():
    model = tiny_model(3, w_inter=0.0, w_intra=0.0)
    assert model.target is None and "head" not in model.online
    out = model(tiny_batch(3))
    torch.testing.assert_close(out["loss"].detach(), out["loss_rec"])
    assert model.update_target(1, 10) is None
    with pytest.raises(ConfigError, match="all 0"):
        Alice(tiny_cfg(3, w_rec=0.0, w_inter=0.0, w_intra=0.0))


def test_without_casa_compares_token_features_position_by_position():
    model = tiny_model(3, use_casa=False).eval()
    assert model.casa is None
    batch = tiny_batch(3)
    b = batch["q"].shape[0]
    views = make_alice_views(batch["q"], batch["k"], model.encoder.num_tokens, 0.75,
                             model.cfg.aug, torch.Generator().manual_seed(0))
    out = model.forward_views(views)
    v, h, y = heads_by_hand(model, views)
    torch.testing.assert_close(out["loss_intra"], negative_cosine(h[:b], y[:b]) + negative_cosine(h[b:], y[b:]))


@pytest.mark.parametrize("similarity", ["infonce", "dino"])
def test_other_similarities(similarity):
    model = tiny_model(3, similarity=similarity)
    out = model(tiny_batch(3))
    assert torch.isfinite(out["loss"])
    assert float(out["loss_inter"]) > 0 and float(out["loss_intra"]) > 0  # both are cross-entropies
    out["loss"].backward()
    assert all(p.grad is not None for p in trainable(model).values())
    if similarity == "dino":
        assert set(model.dino) == {"inter", "intra"}
        assert all(d.center.abs().sum() > 0 for d in model.dino.values())  # centres updated


def test_optional_predictor_on_the_student_side():
    model = tiny_model(3, predictor_hidden_dim=16).eval()
    assert set(model.predictors) == {"inter", "intra"}
    batch = tiny_batch(3)
    b = batch["q"].shape[0]
    views = make_alice_views(batch["q"], batch["k"], model.encoder.num_tokens, 0.75,
                             model.cfg.aug, torch.Generator().manual_seed(0))
    out = model.forward_views(views)
    with torch.no_grad():
        v, h, y = heads_by_hand(model, views)
        p = model.predictors["inter"](h.mean(1))
        cls_t = y.mean(1)
    torch.testing.assert_close(out["loss_inter"], negative_cosine(p[:b], cls_t[b:]) + negative_cosine(p[b:], cls_t[:b]))
    model.train()
    model(batch)["loss"].backward()
    assert all(q.grad is not None for q in model.predictors.parameters())
    assert tiny_model(3).predictors is None  # the paper's setting: no predictor


@pytest.mark.parametrize("nd", [2, 3])
def test_ten_steps_lower_the_loss(nd):
    model = tiny_model(nd)
    batch = tiny_batch(nd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss_at_fixed_views():
        torch.manual_seed(123)  # same masks and augmentations every time
        return model(batch)["loss"]

    with torch.no_grad():
        torch.manual_seed(123)
        first = {k: float(v) for k, v in model(batch).items()}
    for step in range(10):
        opt.zero_grad()
        loss_at_fixed_views().backward()
        opt.step()
        model.update_target(step + 1, 10)
    with torch.no_grad():
        torch.manual_seed(123)
        last = {k: float(v) for k, v in model(batch).items()}
    assert last["loss"] < first["loss"] - 0.05, (first, last)
    assert last["loss_rec"] < first["loss_rec"], (first, last)


@pytest.mark.parametrize("nd", [2, 3])
def test_preview_and_train_mode(nd):
    model = tiny_model(nd)
    batch = tiny_batch(nd)
    panels = model.preview(batch)
    size = SIZES[nd][0]
    assert set(panels) == {"input", "masked", "reconstruction", "augmented", "key"}
    assert all(a.shape == size and a.dtype.name == "float32" for a in panels.values())
    visible = panels["masked"] != 0
    assert (panels["reconstruction"][visible] == panels["input"][visible]).all()
    model.train()
    assert model.online.training and not model.target.training


def test_encoder_state_is_the_online_encoder_and_loads_into_unetr():
    cfg = tiny_cfg(3, img_size=(32, 32, 32), patch_size=16, encoder_kwargs=dict(TINY_VIT, num_layers=12))
    torch.manual_seed(0)
    model = Alice(cfg)
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(1.0)
    state, meta = model.encoder_state()
    unetr = UNETR(1, 2, (32, 32, 32), feature_size=8, **TINY_VIT_WIDTH)
    unetr.vit.load_state_dict(state, strict=True)
    for name, p in model.encoder.state_dict().items():
        torch.testing.assert_close(state[name], p, rtol=0, atol=0)
    assert meta["kind"] == "vit" and meta["method"] == "alice" and meta["img_size"] == [32, 32, 32]
    assert meta["patch_size"] == [16, 16, 16] and meta["num_layers"] == 12


def test_batch_and_config_errors():
    model = tiny_model(3)
    batch = tiny_batch(3)
    with pytest.raises(ValueError, match="'k'"):
        model({"q": batch["q"]})
    with pytest.raises(ValueError, match=r"batch\['q'\]"):
        model({"q": batch["q"][..., :8], "k": batch["k"]})
    with pytest.raises(ConfigError, match="similarity"):
        Alice(tiny_cfg(3, similarity="l2"))
    with pytest.raises(ConfigError, match="img_size"):
        Alice(tiny_cfg(3, img_size=(32, 32)))
    with pytest.raises(ConfigError, match="decoder_dim"):
        Alice(tiny_cfg(3, decoder_dim=32, decoder_heads=2))
    with pytest.raises(ConfigError, match="aug.zoom"):
        Alice(tiny_cfg(3, aug=dataclasses.replace(AliceConfig().aug, zoom=(1.2, 0.9))))


def test_config_works_with_yaml_style_overrides():
    from alice3d.config import from_dict, load_config, to_dict

    cfg = load_config(AliceConfig, None, ["aug.zoom=[0.8,1.1]", "similarity=infonce",
                                          "encoder_kwargs={num_layers: 2}", "img_size=[64,64,32]"])
    assert cfg.aug.zoom == (0.8, 1.1) and cfg.similarity == "infonce"
    assert cfg.encoder_kwargs == {"num_layers": 2} and cfg.img_size == (64, 64, 32)
    assert from_dict(AliceConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="similarity"):
        load_config(AliceConfig, None, ["similarity=l2"])


# ---- collapse diagnostics and the anti-collapse options ------------------------------------



def test_spread_metrics_are_those_of_the_cls_projections():
    model = tiny_model(3).eval()
    batch = tiny_batch(3, b=3)
    views = make_alice_views(batch["q"], batch["k"], model.encoder.num_tokens, 0.75,
                             model.cfg.aug, torch.Generator().manual_seed(0))
    out = model.forward_views(views)
    v, h, y = heads_by_hand(model, views)
    torch.testing.assert_close(out["online_std"], feature_spread(h.mean(1)))
    torch.testing.assert_close(out["target_std"], feature_spread(y.mean(1)))
    assert "teacher_cls_std" not in out  # replaced by target_std (the same quantity)
    # Without the inter term, the token features of the intra term are measured instead.
    intra_only = tiny_model(3, w_inter=0.0)(tiny_batch(3))
    assert {"online_std", "target_std"} <= set(intra_only)


def test_ema_start_scales_with_the_run_length():
    assert scaled_momentum_base(0.996, 150, 1500) == pytest.approx(0.96)
    assert scaled_momentum_base(0.996, 100_000, 100_000) == pytest.approx(0.996)
    assert scaled_momentum_base(0.996, 3000, 1500) == pytest.approx(0.998)
    assert scaled_momentum_base(0.99, 10, 1500) == 0.0  # clipped: the target is the online copy
    model = tiny_model(3, ema_reference_steps=1500)
    assert model.ema_start(150) == pytest.approx(0.96)
    assert model.update_target(0, 150) == pytest.approx(0.96)  # cosine schedule starts at the scaled base
    assert model.update_target(150, 150) == pytest.approx(1.0)
    assert tiny_model(3).ema_start(150) == 0.996  # 0 = off: the configured base
    with pytest.raises(ConfigError, match="ema_reference_steps"):
        Alice(tiny_cfg(3, ema_reference_steps=-1))


def test_alignment_warmup_ramps_the_weights_and_survives_a_state_dict_round_trip():
    model = tiny_model(3, align_warmup_steps=4).eval()
    batch = tiny_batch(3)
    for step, scale in ((0, 0.0), (1, 0.25), (4, 1.0), (9, 1.0)):
        model.steps_done.fill_(step)
        torch.manual_seed(0)
        out = model(batch)
        assert float(out["align_scale"]) == pytest.approx(scale)
        expected = out["loss_rec"] + scale * (out["loss_inter"] + out["loss_intra"])
        torch.testing.assert_close(out["loss"].detach(), expected)
    model.update_target(2, 10)
    other = tiny_model(3, align_warmup_steps=4)
    other.load_state_dict(model.state_dict())
    assert other.align_scale() == pytest.approx(0.5)


def test_casa_target_ema_copy_gets_no_gradient_and_follows_the_ema():
    model = tiny_model(3, casa_target="ema")
    assert model.casa_target is not None and not model.casa_target.training
    assert all(not p.requires_grad for p in model.casa_target.parameters())
    model(tiny_batch(3))["loss"].backward()
    assert all(p.grad is None for p in model.casa_target.parameters())
    with torch.no_grad():
        for p in model.casa.parameters():
            p.add_(0.1)
    before = {n: p.clone() for n, p in model.casa_target.named_parameters()}
    live = dict(model.casa.named_parameters())
    m = model.update_target(3, 10)
    for name, p in model.casa_target.named_parameters():
        torch.testing.assert_close(p, before[name] + (1 - m) * (live[name].detach() - before[name]))
    # T comes from the EMA copy: with its weights changed, the intra loss changes, the inter one not.
    model.eval()
    batch = tiny_batch(3)
    torch.manual_seed(0)
    a = model(batch)
    with torch.no_grad():
        for p in model.casa_target.parameters():
            p.mul_(0.5)
    torch.manual_seed(0)
    b = model(batch)
    torch.testing.assert_close(a["loss_inter"], b["loss_inter"])
    assert not torch.allclose(a["loss_intra"], b["loss_intra"])
    assert tiny_model(3).casa_target is None  # default: the live weights under no_grad


def test_head_batchnorm_uses_the_teachers_own_batch_statistics():
    model = tiny_model(3, head_bn=True, predictor_hidden_dim=16, predictor_norm="bn")
    model.train()
    assert model.target["head"].training and not model.target["encoder"].training
    assert isinstance(model.predictors["inter"].net[1], torch.nn.BatchNorm1d)
    out = model(tiny_batch(3))
    out["loss"].backward()
    assert all(p.grad is None for p in model.target.parameters())
    model.eval()
    assert not model.target["head"].training


def test_make_views_applies_the_online_augmentation():
    batch = tiny_batch(3)
    on = tiny_model(3)
    torch.manual_seed(0)
    views = on.make_views(batch)
    assert not torch.allclose(views.images, torch.cat([batch["q"], batch["k"]]))
    off = tiny_model(3, online_aug=dataclasses.replace(AliceConfig().online_aug, enabled=False))
    torch.manual_seed(0)
    torch.testing.assert_close(off.make_views(batch).images, torch.cat([batch["q"], batch["k"]]), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="online_aug.scale"):
        Alice(tiny_cfg(3, online_aug=dataclasses.replace(AliceConfig().online_aug, scale=(0.0, 1.0))))


def test_shipped_anti_collapse_settings_keep_the_teacher_spread_where_the_paper_setting_collapses():
    """20 steps on fixed random crops: the paper's setting alone gives a near-constant teacher
    [cls] (target_std < 0.2); BatchNorm in the head + a BN predictor + a run-length EMA keep it > 0.3."""

    def run(**kw):
        torch.manual_seed(0)
        model = Alice(tiny_cfg(3, **kw))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = tiny_batch(3, b=4)
        spreads = []
        for step in range(20):
            model.train()
            torch.manual_seed(step)
            out = model(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            model.update_target(step + 1, 20)
            spreads.append(float(out["target_std"]))
        return sum(spreads[-5:]) / 5

    assert run() < 0.2
    assert run(head_bn=True, predictor_hidden_dim=32, predictor_norm="bn", ema_reference_steps=200) > 0.3
