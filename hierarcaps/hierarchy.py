"""Caption hierarchies: the data model every part of hierarcaps shares.

A *hierarchy* is four captions ("tiers") T1 -> T2 -> T3 -> T4, from the most general (T1,
e.g. ``animal``) to the most specific (T4, the original human caption). Each tier is entailed
by every later tier and does not entail it. A *train item* pairs a positive hierarchy P1..P4
with a negative one N1..N4 in which N_i contradicts P_i and, for i > 1, N_i is a child of
P_(i-1).

Two text encodings exist:

* the authors' **release** format, tiers joined by ``" => "`` (general to specific);
* the **completer** format, tiers joined by a delimiter token: ``T1 → T2 → T3 → T4``
  (forward, general to specific) or ``T4 ← T3 ← T2 ← T1`` (backward). A completer prompt is
  a prefix ending in the delimiter (``T1 → T2 →``); with no leading tier it is the bare
  delimiter (``→``), which tells the completer the direction.

The structural checks of positive completion (SPEC section 2, step 5) live here as pure
functions that return the reason for a rejection (``None`` when a candidate passes), so every
stage can count its losses by reason.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Sequence

N_TIERS = 4
RELEASE_DELIMITER = " => "
FORWARD = "→"
BACKWARD = "←"

_WHITESPACE = re.compile(r"\s+")


class HierarchyError(ValueError):
    """A text that should hold a hierarchy does not."""


class Rejection(str, enum.Enum):
    """Why a candidate hierarchy (or tier) was rejected; the values appear in stage stats."""

    WRONG_TIER_COUNT = "wrong_tier_count"
    EMPTY_TIER = "empty_tier"
    IDENTICAL_ADJACENT_TIERS = "identical_adjacent_tiers"
    T3_NOT_TWO_WORDS_SHORTER = "t3_not_two_words_shorter"
    T3_NOT_TEN_CHARS_SHORTER = "t3_not_ten_chars_shorter"
    NOT_ENTAILED = "not_entailed"
    NOT_CONTRADICTING = "not_contradicting"


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class Hierarchy:
    """Four tiers, general (index 0, T1) to specific (index 3, T4)."""

    tiers: tuple[str, str, str, str]

    def __post_init__(self) -> None:
        if len(self.tiers) != N_TIERS:
            raise HierarchyError(f"a hierarchy has {N_TIERS} tiers, got {len(self.tiers)}: {self.tiers!r}")
        if not all(isinstance(t, str) for t in self.tiers):
            raise HierarchyError(f"every tier must be a string, got {self.tiers!r}")

    @classmethod
    def of(cls, tiers: Sequence[str]) -> "Hierarchy":
        """Build from any sequence of four tier texts (general to specific)."""
        return cls(tuple(tiers))  # type: ignore[arg-type]

    @classmethod
    def from_release(cls, text: str) -> "Hierarchy":
        """Parse the release format ``T1 => T2 => T3 => T4``."""
        tiers = [t.strip() for t in text.split(RELEASE_DELIMITER.strip())]
        if len(tiers) != N_TIERS:
            raise HierarchyError(
                f"expected {N_TIERS} tiers joined by {RELEASE_DELIMITER!r}, found {len(tiers)} in {text!r}"
            )
        return cls.of(tiers)

    def to_release(self) -> str:
        """Format as the release text ``T1 => T2 => T3 => T4``."""
        return RELEASE_DELIMITER.join(self.tiers)

    def forward(self) -> str:
        """Completer string, general to specific: ``T1 → T2 → T3 → T4``."""
        return format_chain(self.tiers, FORWARD)

    def backward(self) -> str:
        """Completer string, specific to general: ``T4 ← T3 ← T2 ← T1``."""
        return format_chain(self.tiers[::-1], BACKWARD)

    @property
    def caption(self) -> str:
        """The most specific tier, T4 (the original caption)."""
        return self.tiers[-1]


@dataclass(frozen=True)
class TrainItem:
    """A positive hierarchy and its contradicting negative hierarchy."""

    positive: Hierarchy
    negative: Hierarchy


def format_chain(tiers: Sequence[str], delimiter: str) -> str:
    """Join tiers in the order given with ``" {delimiter} "`` (no trailing delimiter)."""
    return f" {delimiter} ".join(tiers)


def completer_prompt(tiers: Sequence[str], delimiter: str) -> str:
    """The completer input for the given leading tiers: ``T1 → T2 →``, or the bare ``→``."""
    return " ".join([*(f"{t} {delimiter}" for t in tiers)]) if tiers else delimiter


def split_chain(text: str, delimiter: str) -> list[str]:
    """Split a completer output into stripped tiers, in the order written.

    Every delimiter separates two tiers: empty tiers are kept (as ``""``), a trailing one too
    (``a ← b ← c ←`` is four tiers, the last empty, not three), so that the structural checks
    reject them by name. Only a blank text gives ``[]``.
    """
    parts = [normalize_text(p) for p in text.split(delimiter)]
    return [] if parts == [""] else parts


def first_tier(text: str, delimiter: str = FORWARD) -> str:
    """The generated text up to the next delimiter (or the end): one hallucinated tier."""
    return normalize_text(text.split(delimiter, 1)[0])


def check_completion(caption: str, backward_tiers: Sequence[str]) -> Rejection | None:
    """Structural checks of a positive completion (SPEC section 2, step 5).

    ``backward_tiers`` is the parsed completer output for input ``T4 ←``: ``[T3, T2, T1]``.
    Returns the first failed check, cheapest first, or ``None`` when the candidate passes
    (it still needs the entailment test).
    """
    if len(backward_tiers) != N_TIERS - 1:
        return Rejection.WRONG_TIER_COUNT
    t3, t2, t1 = backward_tiers
    chain = [t1, t2, t3, caption]
    if any(not t.strip() for t in chain):
        return Rejection.EMPTY_TIER
    if any(a == b for a, b in zip(chain, chain[1:])):
        return Rejection.IDENTICAL_ADJACENT_TIERS
    if len(t3.split()) > len(caption.split()) - 2:
        return Rejection.T3_NOT_TWO_WORDS_SHORTER
    if len(t3) > len(caption) - 10:
        return Rejection.T3_NOT_TEN_CHARS_SHORTER
    return None
