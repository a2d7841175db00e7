"""Losses on chains of L != 4 levels with masks for missing texts (taxonomies), against plain loops.

Each reference below is written independently of finetune.losses: one (item, level) at a time,
skipping every term that involves a missing text, in float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.losses import ec_loss, level_contrastive_loss, rcme_loss, re_loss

L, B, D = 6, 5, 7


def angle(e, child, apex) -> float:
    a, b = e - apex, child - e
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.acos(max(-1.0, min(1.0, cos)))


def cone(e, root, eps=0.05) -> float:
    return math.asin(min(1.0, eps / float(np.linalg.norm(e - root))))


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def loop_aggregate(a: dict, b: dict) -> tuple[float, float]:
    """a, b: {(item, level): term} of the existing terms. Released mean and mini-max."""
    total = {key: a.get(key, 0.0) + b.get(key, 0.0) for key in set(a) | set(b)}
    mm = total[max(a, key=a.get)] + total[max(b, key=b.get)]  # a, b never tie on random data
    return mean(list(a.values())) + mean(list(b.values())), mm


def loop_re_ec(pos, neg, root, pm, nm, pos_ref, neg_ref, ec_margin=None, w=(1.0, 1.0, 10.0)):
    a, b = {}, {}
    for j in range(B):
        for i in range(L - 1):
            theta = cone(pos[j, i], root) if ec_margin is not None else 0.0
            if pm[j, i] and pm[j, i + 1]:
                x = angle(pos[j, i], pos[j, i + 1], root)
                a[j, i] = x if ec_margin is None else max(0.0, x - theta + ec_margin)
            if pm[j, i] and nm[j, i]:
                y = angle(pos[j, i], neg[j, i], root)
                b[j, i] = -y if ec_margin is None else max(0.0, -(y - theta) + ec_margin)
    m, mm = loop_aggregate(a, b)
    cos = [float(pos[j, i] @ pos_ref[j, i]) for j in range(B) for i in range(L) if pm[j, i]]
    cos += [float(neg[j, i] @ neg_ref[j, i]) for j in range(B) for i in range(L) if nm[j, i]]
    reg = (1 - mean(cos)) / 2
    return {"mean": m, "minimax": mm, "reg": reg, "total": w[0] * m + w[1] * mm + w[2] * reg}


def loop_rcme(pos, neg, root, image, pm, nm, scale, alpha=math.pi / 2, beta=0.1):
    pos_terms, neg_terms, glob = [], [], []
    for j in range(B):
        for i in range(L - 1):
            if i > 0 and not pm[j, i - 1]:
                continue  # the moving apex P_(i-1) is missing
            apex = root if i == 0 else pos[j, i - 1]
            if pm[j, i] and pm[j, i + 1]:
                pos_terms.append(angle(pos[j, i], pos[j, i + 1], apex))
            if pm[j, i] and nm[j, i]:
                neg_terms.append(angle(pos[j, i], neg[j, i], apex))
        for k in range(1, L - 1):
            if pm[j, k - 1] and pm[j, k] and pm[j, k + 1]:
                s1 = min(1.0, max(0.0, math.cos(angle(pos[j, k - 1], pos[j, k], root))))
                s2 = min(1.0, max(0.0, math.cos(angle(pos[j, k], pos[j, k + 1], root))))
                glob.append(max(0.0, angle(pos[j, k - 1], pos[j, k + 1], root) - math.acos(s1 * s2) + alpha))
    local = mean(pos_terms) - mean(neg_terms)
    leaf = np.stack([pos[j, max(i for i in range(L) if pm[j, i])] for j in range(B)])  # most specific text
    logits = scale * image @ leaf.T
    i2t = -np.mean([logits[r, r] - np.log(np.exp(logits[r]).sum()) for r in range(B)])
    t2i = -np.mean([logits[r, r] - np.log(np.exp(logits[:, r]).sum()) for r in range(B)])
    cma = (i2t + t2i) / 2
    return {"local": local, "global": mean(glob), "cma": cma, "total": local + mean(glob) + beta * cma}


def loop_level(image, text, labels, mask, scale):
    per_level = []
    for lev in range(labels.shape[1]):
        rows = [r for r in range(len(labels)) if mask[r, lev]]
        if not rows:
            per_level.append(None)
            continue
        ids = sorted({int(labels[r, lev]) for r in rows})
        emb = {u: text[next(r for r in rows if labels[r, lev] == u), lev] for u in ids}
        logit = {(r, u): scale * float(image[r] @ emb[u]) for r in rows for u in ids}
        i2l = mean([-(logit[r, int(labels[r, lev])] - math.log(sum(math.exp(logit[r, u]) for u in ids))) for r in rows])
        l2i = mean([
            -(math.log(sum(math.exp(logit[r, u]) for r in rows if labels[r, lev] == u))
              - math.log(sum(math.exp(logit[r, u]) for r in rows)))
            for u in ids
        ])
        per_level.append((i2l + l2i) / 2)
    present = [x for x in per_level if x is not None]
    return [0.0 if x is None else x for x in per_level], sum(present) / len(present)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(7)
    pos, neg = unit(torch.randn(B, L, D, generator=gen, dtype=torch.float64)), unit(torch.randn(B, L, D, generator=gen, dtype=torch.float64))
    pos_ref, neg_ref = unit(torch.randn(B, L, D, generator=gen, dtype=torch.float64)), unit(torch.randn(B, L, D, generator=gen, dtype=torch.float64))
    root = unit(torch.randn(D, generator=gen, dtype=torch.float64)) * 0.3
    image = unit(torch.randn(B, D, generator=gen, dtype=torch.float64))
    pm = torch.ones(B, L, dtype=torch.bool)
    pm[1, 5] = pm[1, 4] = False  # trailing ranks missing (identified to family only)
    pm[2, 2] = False  # an interior rank missing
    pm[3, 0] = False  # the top rank missing
    nm = pm.clone()
    nm[0, 3] = nm[4, 5] = nm[:, 0] = False  # only children have no sibling negative
    return pos, neg, root, image, pm, nm, pos_ref, neg_ref


def test_re_and_ec_on_six_masked_levels_match_loops(batch):
    pos, neg, root, image, pm, nm, pos_ref, neg_ref = batch
    args = [x.numpy() for x in (pos, neg, root, pm, nm, pos_ref, neg_ref)]
    got = re_loss(pos, neg, root, pos_ref, neg_ref, pos_mask=pm, neg_mask=nm)
    want = loop_re_ec(*args)
    for key in want:
        assert got[key].item() == pytest.approx(want[key], abs=1e-6), key
    got = ec_loss(pos, neg, root, pos_ref, neg_ref, margin=math.pi / 8, pos_mask=pm, neg_mask=nm)
    want = loop_re_ec(*args, ec_margin=math.pi / 8)
    for key in want:
        assert got[key].item() == pytest.approx(want[key], abs=1e-6), key
    # The mask matters: unmasked, the missing texts' (random) embeddings change the loss.
    assert abs(re_loss(pos, neg, root, pos_ref, neg_ref)["total"].item() - want["total"]) > 1e-3


def test_rcme_on_six_masked_levels_matches_loop(batch):
    pos, neg, root, image, pm, nm, _, _ = batch
    got = rcme_loss(pos, neg, root, image, logit_scale=torch.tensor(10.0, dtype=torch.float64), pos_mask=pm, neg_mask=nm)
    want = loop_rcme(pos.numpy(), neg.numpy(), root.numpy(), image.numpy(), pm.numpy(), nm.numpy(), 10.0)
    for key in want:
        assert got[key].item() == pytest.approx(want[key], abs=1e-6), key
    # All-true masks are the unmasked loss.
    ones = torch.ones(B, L, dtype=torch.bool)
    full = rcme_loss(pos, neg, root, image, 10.0)
    masked = rcme_loss(pos, neg, root, image, 10.0, pos_mask=ones, neg_mask=ones)
    assert all(torch.allclose(full[k], masked[k], atol=1e-12) for k in full)


def test_level_loss_with_missing_ranks_balances_present_levels(batch):
    _, _, _, image, pm, _, _, _ = batch
    gen = torch.Generator().manual_seed(3)
    text = unit(torch.randn(B, L, D, generator=gen, dtype=torch.float64))
    labels = torch.tensor([[0, 0, 1, 2, 3, 4]] * B)
    labels[:, 0] = 0  # one top-rank taxon
    labels[2:, 1] = 1  # two labels at level 2, shared
    labels[:, 2:] = torch.arange(B)[:, None] + 10 * torch.arange(2, L)  # distinct below
    labels[4, 5] = labels[3, 5]  # a shared species label
    for j in range(B):  # equal labels have equal texts
        for lev in range(L):
            first = int((labels[:, lev] == labels[j, lev]).nonzero()[0])
            text[j, lev] = text[first, lev]
    mask = pm.clone()
    mask[:, 4] = False  # nobody has level 5 in this batch
    got = level_contrastive_loss(image, text, labels, 10.0, mask)
    want_levels, want_total = loop_level(image.numpy(), text.numpy(), labels.numpy(), mask.numpy(), 10.0)
    assert got["per_level"].tolist() == pytest.approx(want_levels, abs=1e-6)
    assert got["total"].item() == pytest.approx(want_total, abs=1e-6)
    assert got["per_level"][4].item() == 0.0 and got["per_level"][0].item() == pytest.approx(0.0, abs=1e-9)
    # Group balance: the total is the plain mean over the five present levels.
    assert got["total"].item() == pytest.approx(sum(want_levels) / 5, abs=1e-9)
