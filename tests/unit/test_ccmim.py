"""ccMIM in 2D and 3D: attention scores, importance masking, losses, export."""

import math

import pytest
import torch
from monai.networks.nets import ViT

from alice3d.config import ConfigError
from alice3d.core.losses import info_nce
from alice3d.core.masking import importance_masking
from alice3d.encoders.vit import ViTEncoder
from alice3d.methods.ccmim import CCMIM, CCMIMConfig, cls_attention_scores

TINY_ENCODER = dict(hidden_size=48, mlp_dim=96, num_heads=4, num_layers=2)
SIZES = {2: (16, 16), 3: (8, 8, 8)}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_ccmim(nd, seed=0, **kw):
    args = dict(encoder="vit_tiny", encoder_kwargs=dict(TINY_ENCODER), img_size=SIZES[nd], patch_size=4,
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
    assert set(first) == {"loss", "loss_rec", "loss_con", "masked_score_gap", "online_std", "target_std"}
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
    enc = ViTEncoder(SIZES[nd], 4, spatial_dims=nd, cls_token=True, save_attn=True, **TINY_ENCODER)
    x = tiny_batch(nd, b=2)["image"]
    scores = cls_attention_scores(enc, x)
    with torch.no_grad():
        enc(x)
    expected = sum(blk.attn.att_mat[:, :, 0, 1:].mean(1) for blk in enc.blocks)
    torch.testing.assert_close(scores, expected)
    assert not scores.requires_grad and scores.shape == (2, enc.num_tokens)


@pytest.mark.parametrize("nd", [2, 3])
def test_masked_set_has_higher_attention_scores_when_noise_is_small(nd):
    model, x = tiny_ccmim(nd, noise_scale=0.05), tiny_batch(nd)["image"]
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
    vit = ViT(in_channels=1, img_size=SIZES[3], patch_size=4, spatial_dims=3, classification=False,
              hidden_size=48, mlp_dim=96, num_heads=4, num_layers=2)
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


def test_ccmim_contrast_is_eq7_with_gradient_through_the_visible_negatives():
    model, batch = tiny_ccmim(2, contrast_weight=1.0), tiny_batch(2)
    model.eval()  # BatchNorm of the projector with fixed statistics, so the recomputation matches
    x = batch["image"]
    torch.manual_seed(5)
    out = model(batch)
    torch.manual_seed(5)
    masking, _ = model.masking(x)
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.projector(model.encoder(x, ids_keep=masking.ids_keep)[:, 0]), dim=-1)
        k = torch.nn.functional.normalize(model.projector(model.encoder(x, ids_keep=masking.ids_masked)[:, 0]), dim=-1)
    t = model.cfg.temperature
    expected = 0.0
    for i in range(q.shape[0]):
        den = sum(math.exp(float(q[i] @ k[j]) / t) for j in range(q.shape[0]))
        den += sum(math.exp(float(q[i] @ q[j]) / t) for j in range(q.shape[0]) if j != i)
        expected += -math.log(math.exp(float(q[i] @ k[i]) / t) / den) / q.shape[0]
    torch.testing.assert_close(out["loss_con"], torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert 0 < float(out["online_std"]) and 0 < float(out["target_std"])
    cross_only = tiny_ccmim(2, contrast_weight=1.0, visible_negatives=False).eval()
    torch.manual_seed(5)
    assert float(cross_only(batch)["loss_con"]) < float(out["loss_con"])  # fewer terms in the denominator
