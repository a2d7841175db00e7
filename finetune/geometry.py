"""Radial-embedding geometry on the unit sphere (HierarCaps paper sections 3-4, SPEC section 3).

Embeddings of a CLIP-style model are unit-normalised, so they lie on the sphere S^(D-1). The
*entailment root* ``r`` is the normalised embedding of the empty string ``""``: the most generic
text there is. Two quantities describe the hierarchy around it:

* **genericness** (radius) ``d_r(e) = |e - r|``: general texts sit close to the root, specific
  ones far from it;
* the **exterior angle** ``Ξ_r(e, e') = arccos(<e - r, e' - e> / (|e - r| |e' - e|))``: the angle
  at ``e`` between the ray that continues ``r -> e`` and the step ``e -> e'``. It is small when
  ``e'`` lies further out along the direction of ``e`` as seen from the root, that is when
  ``e'`` is a plausible specialisation (child) of ``e``.

With a moving apex (RCME), the same angle is measured from another point than the root; every
function therefore takes the apex as an argument.

Numerics: the forward value of the angle is exactly ``arccos`` of the cosine clipped to
``[-1, 1]`` as the papers define it; the backward pass goes through a cosine clipped slightly
inside that interval, because ``d/dx arccos(x)`` is infinite at ``x = ±1``. Where two
embeddings coincide the cosine is defined as 0 (an angle of pi/2) and the gradient is finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Smallest norm used as a divisor; below it two points are taken to coincide.
EPS_NORM = 1e-8
# Distance from ±1 at which the arccos gradient is taken (the value itself is not changed).
EPS_ACOS = 1e-6


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise along the last dimension. ``x``: (..., D) -> (..., D)."""
    # eps keeps an all-zero vector at zero instead of dividing by zero.
    return F.normalize(x, dim=-1, eps=EPS_NORM)


def safe_arccos(cos: torch.Tensor) -> torch.Tensor:
    """``arccos(clip(cos, -1, 1))`` with a finite gradient everywhere. Any shape."""
    exact = torch.arccos(cos.clamp(-1.0, 1.0))
    # The gradient is read at a point just inside [-1, 1], where arccos' slope is finite.
    smooth = torch.arccos(cos.clamp(-1.0 + EPS_ACOS, 1.0 - EPS_ACOS))
    return smooth + (exact - smooth).detach()


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dim with a zero (not NaN) gradient at x = 0. (..., D) -> (...)."""
    sq = (x * x).sum(-1)
    # sqrt'(0) is infinite: take the root of a clamped square and mask the result to 0 at x = 0.
    return torch.where(sq > EPS_NORM**2, sq.clamp_min(EPS_NORM**2).sqrt(), torch.zeros_like(sq))


def radius(e: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Genericness ``d_r(e) = |e - r|``. ``e``: (..., D), ``root``: (D,) or broadcastable -> (...)."""
    return _safe_norm(e - root)


def _direction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vector of ``x`` and whether it has one. (..., D) -> ((..., D), (...) bool)."""
    n = _safe_norm(x)
    has_direction = n > EPS_NORM
    # A (near-)zero vector is divided by 1 instead of ~0, so neither value nor gradient blows up.
    safe_n = torch.where(has_direction, n, torch.ones_like(n))
    return x / safe_n.unsqueeze(-1), has_direction


def cos_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle between ``a`` and ``b``: (..., D) -> (...) in [-1, 1].

    Where either vector is (numerically) zero it has no direction: the cosine is 0 there, with a
    zero gradient.
    """
    ua, valid_a = _direction(a)
    ub, valid_b = _direction(b)
    # Rounding can push |cos| of unit vectors a hair past 1.
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    return torch.where(valid_a & valid_b, cos, torch.zeros_like(cos))


def angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in [0, pi] between vectors ``a`` and ``b``: (..., D) -> (...); pi/2 if either is zero."""
    return safe_arccos(cos_angle(a, b))


def exterior_angle(e: torch.Tensor, e_child: torch.Tensor, apex: torch.Tensor) -> torch.Tensor:
    """Exterior angle ``Ξ_apex(e, e_child) = angle(e - apex, e_child - e)`` in [0, pi].

    ``e``, ``e_child``: (..., D); ``apex`` (the root, or the tier above for RCME): (D,) or
    broadcastable to (..., D). Returns (...).
    """
    return angle_between(e - apex, e_child - e)


def cos_exterior(e: torch.Tensor, e_child: torch.Tensor, apex: torch.Tensor) -> torch.Tensor:
    """``cos Ξ_apex(e, e_child)`` in [-1, 1]: shapes as :func:`exterior_angle`."""
    return cos_angle(e - apex, e_child - e)
