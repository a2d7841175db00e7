"""Hierarchy-alignment losses: RE, EC (ablation), RCME and the level-restricted contrastive loss.

Notation (SPEC section 3). A batch holds B train items; ``pos`` and ``neg`` are their positive
chains P1..PL and negative chains N1..NL embedded and unit-normalised, shape (B, L, D), tier
index 0 = T1 (most general). L = 4 for HierarCaps; a taxonomy has one level per rank
(:mod:`finetune.taxonomy_data`), and ``pos_mask``/``neg_mask`` (B, L) bool mark the texts that
exist (a rank missing for an item, a rank without a sibling negative); every term that involves
a missing text is left out of its mean, and all-True masks (or None) give the unmasked loss. ``root`` (D,) is the normalised embedding of ``""`` from the
*trainable* text encoder, so gradients reach it. ``Ξ_a(e, e')`` is the exterior angle at ``e``
seen from apex ``a`` (:func:`finetune.geometry.exterior_angle`); ``d_r(e) = |e - r|``.

* **RE** (HierarCaps paper, supplementary B.4, as the released code computes it). For each item
  and i = 1..L-1 (1..3 for HierarCaps) the caption triplet (P_i, P_(i+1), N_i) gives a positive term
  ``A_i = Ξ_r(P_i, P_(i+1))`` and a negative term ``B_i = -Ξ_r(P_i, N_i)`` (N4 is unused).
  ``mean = mean(A) + mean(B)``; the hard-example (mini-max) term is
  ``mm = (A+B)[argmax A] + (A+B)[argmax B]`` over all (item, tier) pairs of the batch;
  the regulariser ``reg = (1 - mean cos(E, E_frozen)) / 2`` over all 8 texts of every item, with
  ``E_frozen`` from the frozen pretrained encoder (over the existing texts when masked). ``total = w_mean·mean + w_mm·mm + w_reg·reg``,
  default weights (1, 1, 10).
* **EC** (HierarCaps paper, supplementary C.5): each angle of RE is replaced by the margin
  entailment-cone term ``[±(Ξ_r(e, e') - θ_ε(e)) + α]^+`` with ``sin θ_ε(e) = min(1, ε / d_r(e))``,
  sign + for the positive pair and - for the negative one, and aggregated exactly like RE.
* **RCME** (``seeds/000``, eq. 5-9): local entailment (eq. 5) with a moving apex, global
  transitivity (eq. 6), their combination (eq. 7), cross-modal alignment (eq. 8) weighted by β
  (eq. 9). See :func:`rcme_loss`.
* **Level-restricted contrastive** (``seeds/002``, BioCLIP-HC): image-label InfoNCE computed within
  each hierarchy level over that level's distinct labels, levels averaged. See
  :func:`level_contrastive_loss`.

Every function is vectorised over items and tiers and finite where embeddings coincide (the
geometry helpers define the angle there as pi/2 with a finite gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from finetune.geometry import cos_exterior, exterior_angle, radius, safe_arccos

__all__ = [
    "exterior_angle",
    "radius",
    "re_loss",
    "ec_loss",
    "rcme_loss",
    "clip_contrastive_loss",
    "level_contrastive_loss",
    "regulariser",
    "aperture",
    "RE_WEIGHTS",
]

# (mean, minimax, reg) weights of the RE/EC total (HierarCaps supplementary B.4: λ_RE = 1, λ_reg = 10).
RE_WEIGHTS = (1.0, 1.0, 10.0)
# Smallest radius used as a divisor in the cone aperture; a point at the root has an aperture of pi/2.
EPS_RADIUS = 1e-8


Mask = torch.Tensor | None


def _check_chains(
    pos: torch.Tensor, neg: torch.Tensor, root: torch.Tensor, pos_mask: Mask = None, neg_mask: Mask = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return the (B, L) bool masks (all True where None was given)."""
    if pos.ndim != 3 or pos.shape[1] < 2 or neg.shape != pos.shape:
        raise ValueError(
            f"pos and neg must both have shape (B, L, D) with L >= 2; got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if root.shape != pos.shape[-1:]:
        raise ValueError(f"root must have shape (D,) = ({pos.shape[-1]},); got {tuple(root.shape)}")
    masks = []
    for name, mask in (("pos_mask", pos_mask), ("neg_mask", neg_mask)):
        if mask is None:
            mask = torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device)
        elif mask.shape != pos.shape[:2]:
            raise ValueError(f"{name} must have shape (B, L) = {tuple(pos.shape[:2])}; got {tuple(mask.shape)}")
        masks.append(mask.bool())
    return masks[0], masks[1]


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the ``valid`` entries; 0 (with a zero gradient) when none is valid."""
    return (x * valid).sum() / valid.sum().clamp_min(1)


def _aggregate(
    a: torch.Tensor, b: torch.Tensor, valid_a: torch.Tensor, valid_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mini-max aggregation of per-(item, tier) positive terms ``a`` and negative terms ``b``.

    ``a``, ``b``: (B, L-1); ``valid_a``, ``valid_b``: which terms exist. ``mean = mean(a) + mean(b)``
    over the existing terms; ``mm = (a+b)[argmax a] + (a+b)[argmax b]`` with both argmaxes over the
    existing terms of the flattened batch (the hardest positive and the hardest negative), a
    missing term counting 0 in ``a+b``.
    """
    a, b, valid_a, valid_b = a.flatten(), b.flatten(), valid_a.flatten(), valid_b.flatten()
    total = a * valid_a + b * valid_b
    mean = _masked_mean(a, valid_a) + _masked_mean(b, valid_b)
    minimax = a.new_zeros(())
    for terms, valid in ((a, valid_a), (b, valid_b)):
        if valid.any():
            minimax = minimax + total[terms.masked_fill(~valid, float("-inf")).argmax()]
    return mean, minimax


def regulariser(
    pos: torch.Tensor, neg: torch.Tensor, pos_ref: torch.Tensor, neg_ref: torch.Tensor,
    pos_mask: Mask = None, neg_mask: Mask = None,
) -> torch.Tensor:
    """``(1 - mean cos(E, E_frozen)) / 2`` over all 2L texts per item that exist; inputs (B, L, D), unit-normalised."""
    pos_mask, neg_mask = _check_chains(pos, neg, pos[0, 0], pos_mask, neg_mask)
    cos = torch.cat([(pos * pos_ref).sum(-1), (neg * neg_ref).sum(-1)], dim=1)  # (B, 2L)
    return (1.0 - _masked_mean(cos, torch.cat([pos_mask, neg_mask], dim=1))) / 2.0


def _reg_or_zero(
    pos: torch.Tensor, neg: torch.Tensor, pos_ref: torch.Tensor | None, neg_ref: torch.Tensor | None,
    pos_mask: torch.Tensor, neg_mask: torch.Tensor,
) -> torch.Tensor:
    if (pos_ref is None) != (neg_ref is None):
        raise ValueError("give both pos_ref and neg_ref (frozen reference embeddings) or neither")
    if pos_ref is None:
        return pos.new_zeros(())
    if pos_ref.shape != pos.shape or neg_ref.shape != neg.shape:
        raise ValueError(f"reference embeddings must have shape {tuple(pos.shape)}")
    return regulariser(pos, neg, pos_ref, neg_ref, pos_mask, neg_mask)


def _total(
    mean: torch.Tensor, minimax: torch.Tensor, reg: torch.Tensor, weights: tuple[float, float, float]
) -> dict[str, torch.Tensor]:
    w_mean, w_mm, w_reg = weights
    return {"mean": mean, "minimax": minimax, "reg": reg, "total": w_mean * mean + w_mm * minimax + w_reg * reg}


def re_loss(
    pos: torch.Tensor,
    neg: torch.Tensor,
    root: torch.Tensor,
    pos_ref: torch.Tensor | None = None,
    neg_ref: torch.Tensor | None = None,
    weights: tuple[float, float, float] = RE_WEIGHTS,
    pos_mask: Mask = None,
    neg_mask: Mask = None,
) -> dict[str, torch.Tensor]:
    """Radial Embedding loss (HierarCaps supplementary B.4, released-code form).

    ``pos``, ``neg``: (B, L, D) unit-normalised; ``root``: (D,); ``pos_ref``, ``neg_ref``: (B, L, D)
    frozen reference embeddings of the same texts, or None (then ``reg`` = 0). ``weights`` =
    (mean, minimax, reg); ``pos_mask``, ``neg_mask``: (B, L) existing texts (module docstring).
    Returns scalar tensors ``mean``, ``minimax``, ``reg``, ``total``.
    """
    pm, nm = _check_chains(pos, neg, root, pos_mask, neg_mask)
    parent = pos[:, :-1]
    a = exterior_angle(parent, pos[:, 1:], root)  # A_i = Ξ_r(P_i, P_(i+1)), (B, L-1)
    b = -exterior_angle(parent, neg[:, :-1], root)  # B_i = -Ξ_r(P_i, N_i), (B, L-1)
    mean, minimax = _aggregate(a, b, pm[:, :-1] & pm[:, 1:], pm[:, :-1] & nm[:, :-1])
    return _total(mean, minimax, _reg_or_zero(pos, neg, pos_ref, neg_ref, pm, nm), weights)


def aperture(e: torch.Tensor, root: torch.Tensor, epsilon: float = 0.05) -> torch.Tensor:
    """Entailment-cone half-aperture ``θ_ε(e) = arcsin(min(1, ε / d_r(e)))``. ``e``: (..., D) -> (...)."""
    # A point at the root has an infinitely wide cone: the ratio saturates at 1 instead of dividing by 0.
    ratio = (epsilon / radius(e, root).clamp_min(EPS_RADIUS)).clamp(max=1.0)
    # arcsin(x) = pi/2 - arccos(x); safe_arccos keeps the gradient finite at x = 1.
    return math.pi / 2 - safe_arccos(ratio)


def ec_loss(
    pos: torch.Tensor,
    neg: torch.Tensor,
    root: torch.Tensor,
    pos_ref: torch.Tensor | None = None,
    neg_ref: torch.Tensor | None = None,
    margin: float = 0.0,
    epsilon: float = 0.05,
    weights: tuple[float, float, float] = RE_WEIGHTS,
    pos_mask: Mask = None,
    neg_mask: Mask = None,
) -> dict[str, torch.Tensor]:
    """Margin entailment-cone loss (HierarCaps supplementary C.5), aggregated like :func:`re_loss`.

    Positive pair: ``[Ξ_r(P_i, P_(i+1)) - θ_ε(P_i) + α]^+``; negative pair:
    ``[-(Ξ_r(P_i, N_i) - θ_ε(P_i)) + α]^+``. The margin α sits outside the sign, as in the paper's
    derivation (B.2: the loss is ``max(-α, ±(Ξ - θ)) + α``, whose α -> ∞ limit is RE); α = 0 is
    the main paper's EC ablation. Shapes and return value as :func:`re_loss`.
    """
    pm, nm = _check_chains(pos, neg, root, pos_mask, neg_mask)
    parent = pos[:, :-1]
    theta = aperture(parent, root, epsilon)  # (B, L-1)
    a = F.relu(exterior_angle(parent, pos[:, 1:], root) - theta + margin)
    b = F.relu(-(exterior_angle(parent, neg[:, :-1], root) - theta) + margin)
    mean, minimax = _aggregate(a, b, pm[:, :-1] & pm[:, 1:], pm[:, :-1] & nm[:, :-1])
    return _total(mean, minimax, _reg_or_zero(pos, neg, pos_ref, neg_ref, pm, nm), weights)


def _frozen(logit_scale: torch.Tensor | float) -> torch.Tensor | float:
    """The logit scale as a constant: RCME and the level loss never train it."""
    return logit_scale.detach() if isinstance(logit_scale, torch.Tensor) else logit_scale


def _label_info_nce(
    image: torch.Tensor, label_emb: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE between images and a set of candidate labels, some shared by several images.

    ``image``: (B, D); ``label_emb``: (U, D) one row per distinct label; ``target``: (B,) the
    label index of each image. image -> label: cross-entropy of ``s · image @ label.T`` (B, U);
    label -> image: for each label ``-log(Σ_pos exp / Σ_all exp)`` over the B images, the
    positives being the images that carry it. Returns the mean of the two directions. With one
    label per image (``target = arange(B)``) this is CLIP's loss.
    """
    logits = scale * image @ label_emb.T  # (B, U)
    image_to_label = F.cross_entropy(logits, target)
    positive = F.one_hot(target, len(label_emb)).T.bool()  # (U, B)
    log_all = torch.logsumexp(logits.T, dim=1)
    log_pos = torch.logsumexp(logits.T.masked_fill(~positive, float("-inf")), dim=1)
    return (image_to_label + (log_all - log_pos).mean()) / 2


def clip_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of ``image`` and ``text`` (B, D), unit-normalised.

    ``logits = s · image @ text.T``; the loss is the mean of the image->text and text->image
    cross-entropies with the diagonal as targets. ``logit_scale`` s is used as given (exp already
    applied) and never receives a gradient (RCME freezes it). Every row is its own label (equal
    texts in a batch are still each other's negatives, as in CLIP): :func:`_label_info_nce` with
    ``target = arange(B)``.
    """
    targets = torch.arange(len(image), device=image.device)
    return _label_info_nce(image, text, targets, _frozen(logit_scale))


def rcme_loss(
    pos: torch.Tensor,
    neg: torch.Tensor,
    root: torch.Tensor,
    image: torch.Tensor | None = None,
    logit_scale: torch.Tensor | float | None = None,
    alpha: float = math.pi / 2,
    beta: float = 0.1,
    pos_mask: Mask = None,
    neg_mask: Mask = None,
) -> dict[str, torch.Tensor]:
    """Radial Cross-Modal Embedding loss (``seeds/000``, eq. 5-9) on chains of L levels.

    * ``local`` (eq. 5, moving apex): for i = 1..L-1, ``Ξ_(a_i)(P_i, P_(i+1)) - Ξ_(a_i)(P_i, N_i)``
      with apex ``a_1 = r`` and ``a_i = P_(i-1)`` for i > 1 (the released code's shift
      ``a = e_i - e_(i-1)``, ``b = e_j - e_(i-1)``). The triplets are RE's (P_i, P_(i+1), N_i);
      the mean of the positive angles minus the mean of the negative angles (equal to the mean of
      the differences when nothing is masked; a masked negative leaves its positive term in).
      A term exists when its texts and its apex exist.
    * ``global`` (eq. 6, transitivity) for the consecutive positive triples (P_(j-1), P_j, P_(j+1)),
      j = 2..L-1: ``max(0, Ξ_r(P_(j-1), P_(j+1)) - arccos(S(P_(j-1), P_j) · S(P_j, P_(j+1))) + α)``,
      ``S = cos Ξ_r`` clipped to [0, 1] (eq. 2, angles from the root as in eq. 1), α = pi/2,
      averaged. The released code never applies this term; we follow the paper.
    * ``cma`` (eq. 8): symmetric InfoNCE between each item's most specific existing text (P_L
      unless masked) and its ``image`` with the frozen ``logit_scale`` (0 when ``image`` is None).
    * ``total`` (eq. 7 + eq. 9) = ``local + global + β · cma``.

    ``pos``, ``neg``: (B, L, D); ``root``: (D,); ``image``: (B, D); all unit-normalised;
    ``pos_mask``, ``neg_mask``: (B, L) existing texts.
    """
    pm, nm = _check_chains(pos, neg, root, pos_mask, neg_mask)
    parent = pos[:, :-1]
    apex = torch.cat([root.expand_as(pos[:, :1]), pos[:, :-2]], dim=1)  # (B, L-1, D): r, P1, .., P_(L-2)
    apex_ok = torch.cat([torch.ones_like(pm[:, :1]), pm[:, :-2]], dim=1)
    valid_pos = pm[:, :-1] & pm[:, 1:] & apex_ok
    valid_neg = pm[:, :-1] & nm[:, :-1] & apex_ok
    local = _masked_mean(exterior_angle(parent, pos[:, 1:], apex), valid_pos) - _masked_mean(
        exterior_angle(parent, neg[:, :-1], apex), valid_neg
    )

    grand, mid, child = pos[:, :-2], pos[:, 1:-1], pos[:, 2:]  # (B, L-2, D) each: triples j = 2..L-1
    s_upper = cos_exterior(grand, mid, root).clamp(0.0, 1.0)
    s_lower = cos_exterior(mid, child, root).clamp(0.0, 1.0)
    global_terms = F.relu(exterior_angle(grand, child, root) - safe_arccos(s_upper * s_lower) + alpha)
    global_ = _masked_mean(global_terms, pm[:, :-2] & pm[:, 1:-1] & pm[:, 2:])

    if image is None:
        cma = pos.new_zeros(())
    else:
        if logit_scale is None:
            raise ValueError("rcme_loss with images needs the model's logit_scale")
        levels = torch.arange(pos.shape[1], device=pos.device)
        deepest = torch.where(pm, levels, -1).amax(dim=1).clamp_min(0)  # (B,) last existing level
        cma = clip_contrastive_loss(image, pos[torch.arange(len(pos), device=pos.device), deepest], logit_scale)
    return {"local": local, "global": global_, "cma": cma, "total": local + global_ + beta * cma}


def level_contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor | float,
    mask: Mask = None,
) -> dict[str, torch.Tensor]:
    """Level-restricted, level-balanced image-label contrastive loss (``seeds/002``, BioCLIP-HC).

    ``image``: (B, D) and ``text``: (B, L, D) unit-normalised, ``text[b, l]`` the level-l label of
    item b; ``labels``: (B, L) integer ids, equal ids meaning the same label at that level;
    ``mask``: (B, L) bool, False where item b has no level-l label (a missing rank), or None.
    Within each level l the candidates are that level's *distinct* labels only (no cross-level
    negatives, and two images of the same class are not each other's negatives):

    * image -> label: cross-entropy of ``s · image @ label.T`` (B, U_l) against the item's label;
    * label -> image: for each distinct label, ``-log(Σ_pos exp / Σ_all exp)`` over the B images,
      the positives being the images that carry it;

    A level is computed over the items that have it. Group-balanced weighting (BioCLIP-HC: "coarse
    and fine taxonomic ranks receive balanced supervision"): each level is one group, ``per_level[l]``
    is the mean of the two directions over that level's items and labels, and ``total`` is the plain
    mean over the levels present in the batch, so every level weighs alike whatever its number of
    distinct labels or of items carrying it. ``per_level[l]`` is 0 for a level no item has.
    """
    if text.ndim != 3 or text.shape[0] != image.shape[0] or labels.shape != text.shape[:2]:
        raise ValueError(
            f"expected image (B, D), text (B, L, D), labels (B, L); got {tuple(image.shape)}, "
            f"{tuple(text.shape)}, {tuple(labels.shape)}"
        )
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"mask must have shape (B, L) = {tuple(labels.shape)}; got {tuple(mask.shape)}")
    scale = _frozen(logit_scale)
    per_level, present = [], []
    for level in range(text.shape[1]):  # a handful of levels; each level is one batched computation
        rows = torch.arange(len(labels), device=labels.device)
        if mask is not None:
            rows = rows[mask[:, level].bool()]
        if len(rows) == 0:
            per_level.append(image.new_zeros(()))
            continue
        ids, inverse = torch.unique(labels[rows, level], return_inverse=True)  # (U,), (B_l,)
        first = torch.zeros(len(ids), dtype=torch.long, device=labels.device).scatter_reduce(
            0, inverse, torch.arange(len(inverse), device=labels.device), reduce="amin", include_self=False
        )
        label_rows = text[rows[first], level]  # (U, D)
        per_level.append(_label_info_nce(image[rows], label_rows, inverse, scale))
        present.append(level)
    per_level_t = torch.stack(per_level)
    return {"per_level": per_level_t, "total": per_level_t[present].mean()}
