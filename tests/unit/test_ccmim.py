"""ccMIM in 2D and 3D: attention scores, importance masking, losses, export."""

import math

import pytest
import torch
from monai.networks.nets import ViT

from alice3d.config import ConfigError
from alice3d.core.losses import info_nce
from alice3d.core.masking import importance_masking, sampled_masking
from alice3d.encoders.vit import ViTEncoder
from alice3d.methods.ccmim import CCMIM, CCMIMConfig, cls_attention_scores, eq7_info_nce
from helpers import TINY_VIT

SIZES = {2: (16, 16), 3: (8, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_ccmim(nd, seed=0, **kw):
    args = dict(encoder="vit_tiny", encoder_kwargs=dict(TINY_VIT), img_size=SIZES[nd], patch_size=4,
                spatial_dims=nd, decoder_dim=24, decoder_depth=1, decoder_heads=2, proj_hidden_dim=32, proj_dim=16)
    args.update(kw)
    torch.manual_seed(seed)
    return CCMIM(CCMIMConfig(**args))


def tiny_batch(nd, b=4, seed=1):
    return {"image": torch.rand(b, 1, *SIZES[nd], generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("nd,contrast", [(2, "infonce"), (3, "infonce"), (2, "simsiam")])
def test_a_tiny_run_lowers_the_loss(nd, contrast):
    model, batch = tiny_ccmim(nd, contrast=contrast), tiny_batch(nd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def loss():
        torch.manual_seed(5)
        return model(batch)

    with torch.no_grad():
        first = loss()
    assert set(first) == {"loss", "loss_rec", "loss_con", "masked_score_gap", "online_std", "target_std",
                          "online_erank", "target_erank"}
    torch.testing.assert_close(first["loss"], first["loss_rec"] + 0.2 * first["loss_con"])
    for _ in range(15):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = loss()
    assert float(last["loss"]) < float(first["loss"]) - 0.2


@pytest.mark.parametrize("nd", [2, 3])
def test_scores_are_monai_cls_attention_summed_over_layers(nd):
    torch.manual_seed(0)
    enc = ViTEncoder(SIZES[nd], 4, spatial_dims=nd, cls_token=True, save_attn=True, **TINY_VIT)
    x = tiny_batch(nd, b=2)["image"]
    scores = cls_attention_scores(enc, x)
    with torch.no_grad():
        enc(x)
    expected = sum(blk.attn.att_mat[:, :, 0, 1:].mean(1) for blk in enc.blocks)
    torch.testing.assert_close(scores, expected)
    assert not scores.requires_grad and scores.shape == (2, enc.num_tokens)


@pytest.mark.parametrize("nd", [2, 3])
def test_masked_set_has_higher_attention_scores_when_noise_is_small(nd):
    model, x = tiny_ccmim(nd, noise_scale=0.05, mask_selection="topk_noise", score="all_layers"), tiny_batch(nd)["image"]
    torch.manual_seed(2)
    masking, scores = model.masking(x)
    masked_mean = (scores * masking.mask).sum(1) / masking.mask.sum(1)
    visible_mean = (scores * ~masking.mask).sum(1) / (~masking.mask).sum(1)
    assert bool((masked_mean > visible_mean).all())
    # With a huge noise scale the masking forgets the scores: the gap shrinks towards zero.
    torch.manual_seed(2)
    small = float(model(tiny_batch(nd))["masked_score_gap"])
    model.cfg.noise_scale = 1000.0
    gaps = []
    for seed in range(5):
        torch.manual_seed(seed)
        gaps.append(float(model(tiny_batch(nd))["masked_score_gap"]))
    assert small > 0.2 and abs(sum(gaps) / len(gaps)) < 0.5 * small


def test_noise_free_importance_masking_masks_the_top_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    m = importance_masking(scores, 0.5, noise_scale=0.0)
    assert m.mask.tolist() == [[False, True, False, True]]


def test_masked_branch_is_a_stop_gradient_target():
    model, batch = tiny_ccmim(2, contrast_weight=1.0), tiny_batch(2)
    calls = []
    hook = model.encoder.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((kwargs["ids_keep"].shape[1], out.requires_grad)), with_kwargs=True
    )
    torch.manual_seed(5)
    out = model(batch)
    hook.remove()
    n_tokens = model.encoder.num_tokens
    n_mask = round(0.75 * n_tokens)
    # One encoder pass with gradients on the visible set, one without on the masked set.
    assert calls == [(n_tokens - n_mask, True), (n_mask, False)]
    out["loss"].backward()
    assert model.encoder.cls_token.grad is not None and model.projector.net[0].weight.grad is not None


def test_export_drops_the_cls_token_and_loads_into_monai_vit():
    model = tiny_ccmim(3)
    state, meta = model.encoder_state()
    assert "cls_token" not in state and meta["cls_token"] is False and meta["method"] == "ccmim"
    vit = ViT(in_channels=1, img_size=SIZES[3], patch_size=4, spatial_dims=3, classification=False, **TINY_VIT)
    vit.load_state_dict(state, strict=True)
    panels = model.eval().preview(tiny_batch(3))
    assert {"input", "masked", "reconstruction", "attention"} <= set(panels)
    assert panels["attention"].shape == SIZES[3]


def test_bad_contrast_is_rejected():
    with pytest.raises(ConfigError, match="contrast"):
        CCMIMConfig(encoder="vit_tiny", img_size=(16, 16), spatial_dims=2, patch_size=4, contrast="byol").validate()


def test_eq7_denominator_holds_the_visible_visible_negatives_hand_values():
    # q normalises to the identity, k too: positives e^(1/0.5), cross negatives e^0, one
    # visible-visible negative e^0 per row -> -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2).
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    torch.testing.assert_close(info_nce(q, k, 0.5, self_negatives=True), torch.tensor(math.log1p(2 * math.exp(-2.0))))
    # Identical visible CLS: row 0 has logits k [1, 0] and q_1 1 -> log((2e + 1) / e); row 1 has
    # its positive at 0 against k_0 (1) and q_0 (1) -> log(2e + 1). Mean: log(2e + 1) - 1/2.
    q_same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    k_eye = torch.eye(2)
    torch.testing.assert_close(info_nce(q_same, k_eye, 1.0, self_negatives=True),
                               torch.tensor(math.log(2 * math.e + 1) - 0.5))
    # Without them only the cross terms count (the earlier form).
    torch.testing.assert_close(info_nce(q_same, k_eye, 1.0), torch.tensor(math.log(math.e + 1) - 0.5))


def _contrast_inputs(model, batch):
    torch.manual_seed(5)
    out = model(batch)
    torch.manual_seed(5)
    masking, _ = model.masking(batch["image"])
    x = batch["image"]
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.projector(model.encoder(x, ids_keep=masking.ids_keep)[:, 0]), dim=-1)
        k = torch.nn.functional.normalize(model.projector(model.encoder(x, ids_keep=masking.ids_masked)[:, 0]), dim=-1)
    return out, q, k


def test_ccmim_contrast_is_eq7_anchored_on_the_masked_cls():
    model, batch = tiny_ccmim(2, contrast_weight=1.0), tiny_batch(2)
    model.eval()  # BatchNorm of the projector with fixed statistics, so the recomputation matches
    out, q, k = _contrast_inputs(model, batch)
    t, n = model.cfg.temperature, q.shape[0]
    expected = 0.0
    for i in range(n):  # paper: anchor SG(h^M_i), positive h^V_i, negatives h^V_j and sim(h^V_i, h^V_j), j != i
        den = sum(math.exp(float(k[i] @ q[j]) / t) for j in range(n))
        den += sum(math.exp(float(q[i] @ q[j]) / t) for j in range(n) if j != i)
        expected += -math.log(math.exp(float(k[i] @ q[i]) / t) / den) / n
    torch.testing.assert_close(out["loss_con"], torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert 0 < float(out["online_std"]) and 0 < float(out["target_std"])
    cross_only = tiny_ccmim(2, contrast_weight=1.0, visible_negatives=False).eval()
    torch.manual_seed(5)
    assert float(cross_only(batch)["loss_con"]) < float(out["loss_con"])  # fewer terms in the denominator


def test_eq7_visible_anchor_deviation_is_the_transposed_cross_term():
    model, batch = tiny_ccmim(2, contrast_weight=1.0, eq7_anchor="visible"), tiny_batch(2)
    model.eval()
    out, q, k = _contrast_inputs(model, batch)
    t, n = model.cfg.temperature, q.shape[0]
    expected = 0.0
    for i in range(n):
        den = sum(math.exp(float(q[i] @ k[j]) / t) for j in range(n))
        den += sum(math.exp(float(q[i] @ q[j]) / t) for j in range(n) if j != i)
        expected += -math.log(math.exp(float(q[i] @ k[i]) / t) / den) / n
    torch.testing.assert_close(out["loss_con"], torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_eq7_hand_values_and_gradient_only_through_the_visible_cls():
    # v rows normalise to e0, e1; m to e0, (e0 + e1)/sqrt2. t = 1, no visible-visible terms:
    # row 0: -log(e^1 / (e^1 + e^0)); row 1: m_1.v_0 = m_1.v_1 = 1/sqrt2 -> -log(1/2).
    v = torch.tensor([[2.0, 0.0], [0.0, 3.0]], requires_grad=True)
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = eq7_info_nce(v, m, 1.0, visible_negatives=False)
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    # the transposed form anchors on v: row 0 has logits [1, s], row 1 [0, s] (s = 1/sqrt2)
    transposed = info_nce(v, m, 1.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(transposed, torch.tensor((math.log1p(math.exp(s - 1)) + math.log1p(math.exp(-s))) / 2))
    loss.backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0 and m.grad is None
    # with the visible-visible term: v_0.v_1 = 0 adds e^0 to each row
    with_vv = eq7_info_nce(v.detach(), m.detach(), 1.0)
    torch.testing.assert_close(with_vv, torch.tensor((math.log((math.e + 2) / math.e) + math.log(2 + math.exp(-s))) / 2))


@pytest.mark.parametrize("nd", [2, 3])
def test_last_layer_score_is_the_cls_softmax_over_patch_keys(nd):
    torch.manual_seed(0)
    enc = ViTEncoder(SIZES[nd], 4, spatial_dims=nd, cls_token=True, save_attn=True, **TINY_VIT)
    x = tiny_batch(nd, b=2)["image"]
    scores = cls_attention_scores(enc, x, "last_layer")
    with torch.no_grad():
        enc(x)
    att = enc.blocks[-1].attn.att_mat[:, :, 0, 1:]  # MONAI's softmax over CLS + patch keys
    expected = (att / att.sum(-1, keepdim=True)).mean(1)  # removing the CLS key and renormalising
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.sum(1), torch.ones(2))


def test_sampled_masking_follows_the_scores():
    certain = sampled_masking(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 0.5, generator=torch.Generator().manual_seed(0))
    assert certain.mask.tolist() == [[False, False, True, True]]
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(4000, 1)
    freq = sampled_masking(probs, 0.25, generator=g).mask.float().mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.1, 0.1, 0.1]), atol=0.03, rtol=0)
    uniform = sampled_masking(torch.zeros(2000, 4), 0.5, generator=g).mask.float().mean(0)
    torch.testing.assert_close(uniform, torch.full((4,), 0.5), atol=0.04, rtol=0)


def test_default_masking_samples_from_the_last_layer_score():
    model, x = tiny_ccmim(2), tiny_batch(2)["image"]
    torch.manual_seed(2)
    masking, scores = model.masking(x)
    torch.testing.assert_close(scores.sum(1), torch.ones(x.shape[0]))
    torch.manual_seed(2)
    expect = sampled_masking(cls_attention_scores(model.encoder.eval(), x, "last_layer"), 0.75)
    assert torch.equal(masking.mask, expect.mask)
