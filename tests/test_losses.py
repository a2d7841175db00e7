"""Losses of finetune.losses against hand-computed geometry and independent loop formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.losses import (
    aperture,
    clip_contrastive_loss,
    ec_loss,
    exterior_angle,
    level_contrastive_loss,
    radius,
    rcme_loss,
    re_loss,
)

PI = math.pi


def t(*rows) -> torch.Tensor:
    """float64 tensor of the given rows: t(x, y) is a point, t(chain) a batch of one chain."""
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- independent formulas


def np_angle(e, child, apex) -> float:
    """Exterior angle by the paper's formula, one pair at a time."""
    a, b = np.asarray(e) - np.asarray(apex), np.asarray(child) - np.asarray(e)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.acos(max(-1.0, min(1.0, cos)))


def np_re(pos, neg, root, pos_ref=None, neg_ref=None, w=(1.0, 1.0, 10.0)):
    """RE loss written as a plain loop over items and tiers (HierarCaps supplementary B.4)."""
    terms = []  # (A, B) per (item, tier)
    for j in range(len(pos)):
        for i in range(3):
            terms.append((np_angle(pos[j][i], pos[j][i + 1], root), -np_angle(pos[j][i], neg[j][i], root)))
    a = [x for x, _ in terms]
    b = [y for _, y in terms]
    mean = sum(a) / len(a) + sum(b) / len(b)
    ia, ib = int(np.argmax(a)), int(np.argmax(b))
    mm = a[ia] + b[ia] + a[ib] + b[ib]
    reg = 0.0
    if pos_ref is not None:
        cos = [
            float(np.dot(x[k], y[k]))
            for E, R in ((pos, pos_ref), (neg, neg_ref))
            for x, y in zip(E, R)
            for k in range(4)
        ]
        reg = (1 - sum(cos) / len(cos)) / 2
    return {"mean": mean, "minimax": mm, "reg": reg, "total": w[0] * mean + w[1] * mm + w[2] * reg}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- geometry re-exports


def test_exterior_angle_and_radius_on_hand_built_points():
    root = t(0.0, 0.0)
    e = t(1.0, 0.0)
    assert exterior_angle(e, t(2.0, 0.0), root).item() == pytest.approx(0.0, abs=1e-7)
    assert exterior_angle(e, t(1.0, 1.0), root).item() == pytest.approx(PI / 2)
    assert exterior_angle(e, t(2.0, 1.0), root).item() == pytest.approx(PI / 4)
    assert exterior_angle(e, t(0.5, 0.0), root).item() == pytest.approx(PI)
    # 3-D, apex off the origin: e - apex = (0, 0, 1), child - e = (0, 1, 1) -> 45 degrees.
    assert exterior_angle(t(1.0, 0.0, 1.0), t(1.0, 1.0, 2.0), t(1.0, 0.0, 0.0)).item() == pytest.approx(PI / 4)
    assert radius(t(3.0, 4.0), root).item() == pytest.approx(5.0)


# ----------------------------------------------------------------------------- RE


def hand_batch():
    """One item in the plane, root at the origin, with known angles.

    A = (0, 0, 0): the positive chain runs straight out along x.
    B = (-pi/2, -pi/2, -pi): N1 and N2 step sideways, N3 steps back towards the root.
    """
    pos = t([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    neg = t([[1.0, 1.0], [2.0, -1.0], [2.0, 0.0], [9.0, 9.0]])
    return pos, neg, t(0.0, 0.0)


def test_re_loss_hand_built_values():
    pos, neg, root = hand_batch()
    out = re_loss(pos, neg, root)
    assert out["mean"].item() == pytest.approx(0.0 + (-PI / 2 - PI / 2 - PI) / 3)
    # argmax A is tier 1 (all tie: first), argmax B is tier 1 (first of the two -pi/2): 2 * (0 - pi/2).
    assert out["minimax"].item() == pytest.approx(-PI)
    assert out["reg"].item() == 0.0
    assert out["total"].item() == pytest.approx(-2 * PI / 3 - PI)


def test_re_loss_hard_example_picks_largest_positive_and_smallest_negative_angle():
    """Two items; the hardest positive is item 2 tier 3, the hardest negative item 1 tier 2."""
    pos = t(
        [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]],
        [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [3.0, 1.0]],  # A_3 = pi/2
    )
    neg = t(
        [[1.0, 1.0], [3.0, 1.0], [3.0, -1.0]],  # B_2 = -pi/4
        [[1.0, 1.0], [2.0, 1.0], [3.0, -1.0]],
    )
    neg = torch.cat([neg, torch.full((2, 1, 2), 9.0, dtype=torch.float64)], dim=1)
    out = re_loss(pos, neg, t(0.0, 0.0))
    assert out["minimax"].item() == pytest.approx((PI / 2 - PI / 2) + (0.0 - PI / 4))


def test_re_loss_matches_loop_formula_on_random_embeddings():
    gen = torch.Generator().manual_seed(3)
    pos, neg, pos_ref, neg_ref = (unit(torch.randn(5, 4, 16, generator=gen, dtype=torch.float64)) for _ in range(4))
    root = unit(torch.randn(16, generator=gen, dtype=torch.float64))
    out = re_loss(pos, neg, root, pos_ref, neg_ref)
    ref = np_re(pos.numpy(), neg.numpy(), root.numpy(), pos_ref.numpy(), neg_ref.numpy())
    for key in ("mean", "minimax", "reg", "total"):
        assert out[key].item() == pytest.approx(ref[key], abs=1e-6), key
    weighted = re_loss(pos, neg, root, pos_ref, neg_ref, weights=(2.0, 0.5, 3.0))
    assert weighted["total"].item() == pytest.approx(2 * ref["mean"] + 0.5 * ref["minimax"] + 3 * ref["reg"], abs=1e-6)


def test_re_regulariser_extremes():
    gen = torch.Generator().manual_seed(0)
    pos, neg = unit(torch.randn(3, 4, 8, generator=gen)), unit(torch.randn(3, 4, 8, generator=gen))
    root = unit(torch.randn(8, generator=gen))
    assert re_loss(pos, neg, root, pos, neg)["reg"].item() == pytest.approx(0.0, abs=1e-6)
    assert re_loss(pos, neg, root, -pos, -neg)["reg"].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="both"):
        re_loss(pos, neg, root, pos, None)


def test_re_loss_finite_with_coinciding_embeddings_and_gradient_reaches_root():
    root = unit(torch.randn(8)).requires_grad_()
    same = root.detach().expand(2, 4, 8).clone().requires_grad_()
    out = re_loss(same, same, root, same.detach(), same.detach())
    out["total"].backward()
    assert torch.isfinite(out["total"]) and torch.isfinite(same.grad).all() and torch.isfinite(root.grad).all()

    gen = torch.Generator().manual_seed(1)
    root = unit(torch.randn(8, generator=gen)).requires_grad_()
    pos, neg = unit(torch.randn(2, 4, 8, generator=gen)), unit(torch.randn(2, 4, 8, generator=gen))
    re_loss(pos, neg, root)["total"].backward()
    assert root.grad.abs().sum() > 0


def test_re_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, L, D\) with L >= 2"):
        re_loss(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        re_loss(torch.zeros(2, 5, 4), torch.zeros(2, 4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="pos_mask"):
        re_loss(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), torch.zeros(4), pos_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="root"):
        re_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.zeros(3))


# ----------------------------------------------------------------------------- EC


def test_aperture_known_values():
    root = t(0.0, 0.0)
    assert aperture(t(0.1, 0.0), root).item() == pytest.approx(PI / 6)  # sin θ = 0.05 / 0.1
    assert aperture(t(0.01, 0.0), root).item() == pytest.approx(PI / 2)  # saturates at min(1, .)
    at_root = t(0.0, 0.0).requires_grad_()
    value = aperture(at_root, root)
    value.backward()
    assert value.item() == pytest.approx(PI / 2) and torch.isfinite(at_root.grad).all()


def test_ec_loss_hand_built_margins():
    # P1 at radius 0.1 (θ = pi/6); P2 straight out (Ξ = 0); N1 sideways (Ξ = pi/2).
    pos = t([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [0.4, 0.0]])
    neg = t([[0.1, 0.1], [0.2, 0.1], [0.3, 0.1], [0.0, 1.0]])
    root = t(0.0, 0.0)
    # Tier 2 and 3 apertures: radius 0.2 -> asin(1/4), 0.3 -> asin(1/6); their negatives have Ξ = pi/2.
    thetas = [PI / 6, math.asin(0.25), math.asin(1 / 6)]
    for alpha in (0.0, PI / 8, PI / 4, PI / 2):
        a = [max(0.0, 0.0 - th + alpha) for th in thetas]
        b = [max(0.0, -(PI / 2 - th) + alpha) for th in thetas]
        out = ec_loss(pos, neg, root, margin=alpha)
        assert out["mean"].item() == pytest.approx(np.mean(a) + np.mean(b)), alpha


def test_ec_loss_large_margin_limit_is_re_mean_plus_two_margins():
    """Supplementary B.2: with every hinge active, EC's mean term is RE's mean term + 2α."""
    gen = torch.Generator().manual_seed(5)
    pos, neg = unit(torch.randn(4, 4, 6, generator=gen, dtype=torch.float64)), unit(
        torch.randn(4, 4, 6, generator=gen, dtype=torch.float64)
    )
    root = unit(torch.randn(6, generator=gen, dtype=torch.float64))
    alpha = 10.0
    assert ec_loss(pos, neg, root, margin=alpha)["mean"].item() == pytest.approx(
        re_loss(pos, neg, root)["mean"].item() + 2 * alpha, abs=1e-9
    )


# ----------------------------------------------------------------------------- RCME


def test_rcme_local_term_uses_moving_apex():
    """Level 2's angle is measured from P1, not from the root: Ξ_P1(P2, P3) = 0 but Ξ_r(P2, P3) = pi/4."""
    root = t(0.0, 0.0)
    pos = t([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    # Negatives chosen so each negative angle is easy to read: N_i = P_i + (1, 0).
    neg = pos + t(1.0, 0.0)
    # Level 1, apex r: Ξ_r(P1, P2) = angle((1,0), (0,1)) = pi/2; Ξ_r(P1, N1) = angle((1,0), (1,0)) = 0.
    # Level 2, apex P1: Ξ(P2, P3) = angle((0,1), (0,1)) = 0; Ξ(P2, N2) = angle((0,1), (1,0)) = pi/2.
    # Level 3, apex P2: the same as level 2.
    expected_local = ((PI / 2 - 0) + (0 - PI / 2) + (0 - PI / 2)) / 3
    out = rcme_loss(pos, neg, root)
    assert out["local"].item() == pytest.approx(expected_local)
    assert out["cma"].item() == 0.0


def test_rcme_global_term_hand_built():
    root = t(0.0, 0.0)
    # Straight chain: S = 1 everywhere, Ξ_r(P_(j-1), P_(j+1)) = 0 -> each triple gives α = pi/2.
    straight = t([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    assert rcme_loss(straight, straight, root)["global"].item() == pytest.approx(PI / 2)
    # P3 steps sideways: triple (P1,P2,P3): Ξ(P1,P3) = pi/4, S(P2,P3) = 0 -> pi/4 - pi/2 + pi/2.
    # triple (P2,P3,P4) with P4 = (2, 2): Ξ(P2,P4) = pi/4 ... computed below from the definition.
    pos = t([[1.0, 0.0], [2.0, 0.0], [2.0, 1.0], [2.0, 2.0]])
    s23 = max(0.0, math.cos(np_angle([2, 0], [2, 1], [0, 0])))
    s34 = max(0.0, math.cos(np_angle([2, 1], [2, 2], [0, 0])))
    second = np_angle([2, 0], [2, 2], [0, 0]) - math.acos(s23 * s34) + PI / 2
    expected = (PI / 4 + max(0.0, second)) / 2
    assert rcme_loss(pos, pos, root)["global"].item() == pytest.approx(expected)


def test_rcme_total_and_cross_modal_term_match_open_clip():
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(2)
    pos, neg = unit(torch.randn(6, 4, 8, generator=gen)), unit(torch.randn(6, 4, 8, generator=gen))
    image, root = unit(torch.randn(6, 8, generator=gen)), unit(torch.randn(8, generator=gen))
    scale = torch.tensor(14.0)
    out = rcme_loss(pos, neg, root, image=image, logit_scale=scale, beta=0.1)
    reference = ClipLoss()(image, pos[:, 3], scale)
    assert out["cma"].item() == pytest.approx(reference.item(), abs=1e-5)
    assert out["total"].item() == pytest.approx((out["local"] + out["global"] + 0.1 * out["cma"]).item(), abs=1e-6)
    with pytest.raises(ValueError, match="logit_scale"):
        rcme_loss(pos, neg, root, image=image)


def test_rcme_finite_with_coinciding_embeddings():
    root = unit(torch.randn(8))
    same = root.expand(3, 4, 8).clone().requires_grad_()
    image = root.expand(3, 8).clone()
    out = rcme_loss(same, same, root, image=image, logit_scale=torch.tensor(10.0))
    out["total"].backward()
    assert torch.isfinite(out["total"]) and torch.isfinite(same.grad).all()


def test_clip_contrastive_equals_plain_clip_formula_with_duplicate_texts():
    """Independent formula: mean of the two diagonal cross-entropies; a repeated text stays a negative."""
    gen = torch.Generator().manual_seed(8)
    image, text = unit(torch.randn(5, 8, generator=gen)), unit(torch.randn(5, 8, generator=gen))
    text[3] = text[1]  # equal texts are still separate rows (CLIP's convention, RCME's eq. 8)
    logits = 7.0 * image @ text.T
    diag = torch.arange(5)
    expected = (torch.nn.functional.cross_entropy(logits, diag) + torch.nn.functional.cross_entropy(logits.T, diag)) / 2
    assert clip_contrastive_loss(image, text, 7.0).item() == pytest.approx(expected.item(), abs=1e-6)


def test_logit_scale_is_frozen_in_contrastive_terms():
    scale = torch.tensor(5.0, requires_grad=True)
    image, text = unit(torch.randn(4, 8)), unit(torch.randn(4, 8)).requires_grad_()
    clip_contrastive_loss(image, text, scale).backward()
    assert scale.grad is None and text.grad is not None


# ----------------------------------------------------------------------------- level-restricted contrastive


def test_level_contrastive_with_distinct_labels_is_clip_loss_per_level():
    gen = torch.Generator().manual_seed(4)
    image, text = unit(torch.randn(5, 8, generator=gen)), unit(torch.randn(5, 3, 8, generator=gen))
    labels = torch.arange(15).view(5, 3)
    out = level_contrastive_loss(image, text, labels, 10.0)
    expected = torch.stack([clip_contrastive_loss(image, text[:, l], 10.0) for l in range(3)])
    assert torch.allclose(out["per_level"], expected, atol=1e-6)
    assert out["total"].item() == pytest.approx(expected.mean().item(), abs=1e-6)


def test_level_contrastive_shared_label_is_no_negative():
    """All items share the level-1 label: its only candidate is the right one, so level 1 costs 0."""
    gen = torch.Generator().manual_seed(6)
    image, text = unit(torch.randn(4, 8, generator=gen)), unit(torch.randn(4, 2, 8, generator=gen))
    text[:, 0] = text[0, 0]
    labels = torch.stack([torch.zeros(4, dtype=torch.long), torch.arange(4)], dim=1)
    out = level_contrastive_loss(image, text, labels, 10.0)
    assert out["per_level"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert out["per_level"][1].item() > 0
    # Balanced: the mean over levels, not weighted by the number of distinct labels.
    assert out["total"].item() == pytest.approx(out["per_level"].mean().item())

    # Two of four images share a level-1 class: the label->image side counts both as positives.
    labels2 = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3]])
    text2 = text.clone()
    text2[:, 0] = torch.stack([text[0, 0], text[0, 0], text[2, 1], text[2, 1]])
    logits = 10.0 * image @ torch.stack([text2[0, 0], text2[2, 0]]).T  # (4, 2)
    target = torch.tensor([0, 0, 1, 1])
    i2l = torch.nn.functional.cross_entropy(logits, target)
    l2i = torch.stack(
        [torch.logsumexp(logits[:, u], 0) - torch.logsumexp(logits[target == u, u], 0) for u in (0, 1)]
    ).mean()
    out2 = level_contrastive_loss(image, text2, labels2, 10.0)
    assert out2["per_level"][0].item() == pytest.approx(((i2l + l2i) / 2).item(), abs=1e-6)
