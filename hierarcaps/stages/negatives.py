"""Negative hallucination (SPEC section 2 step 6; HierarCaps paper, supplementary B.1).

Given a positive hierarchy T1 → T2 → T3 → T4, the completer is prompted forward with ``→``,
``T1 →``, ``T1 → T2 →`` and ``T1 → T2 → T3 →`` (the paper prints the last as ``T1 → T3 → T3 →``,
a typo) and its output is read up to the next ``→`` or the end: T'1 .. T'4. T'_i is valid when

* it is not empty,
* ``p_c(T_i, T'_i) > 0.5`` (it contradicts the positive tier), and
* for i > 1, T_(i-1) is entailed by T'_i and does not entail it (T'_i is a child of the
  positive parent).

This runs for up to ``rounds`` (8) rounds. A valid T'_i found in a round is kept (the first
one found); later rounds prompt only for the tiers still missing. Each round makes ONE
generate call for all missing (item, tier) prompts of a batch of ``batch_size`` items, one
contradiction call for all the round's non-empty outputs and one entailment call for the
contradicting ones with i > 1. Items with all four negatives are emitted with ``negative`` =
[N1, N2, N3, N4]; the others are counted as ``incomplete_negative_chain``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from hierarcaps.generation import TextGenerator
from hierarcaps.hierarchy import FORWARD, N_TIERS, Rejection, completer_prompt, first_tier
from hierarcaps.nli import contradicts, entailed_not_entailing
from hierarcaps.stages._common import as_rows, call_seed, chunks, dump, load_provenance, model_id, record_work, work_counters
from hierarcaps.stats import StageStats

INCOMPLETE_NEGATIVE_CHAIN = "incomplete_negative_chain"


@dataclass
class NegativeSettings:
    """Settings of negative hallucination (paper: 8 rounds, temperature 1.0).

    ``top_k``/``top_p`` filter the sampled tokens; ``None`` (default) is the paper's plain
    temperature sampling.
    """

    rounds: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 48
    batch_size: int = 8
    seed: int = 0


@dataclass
class _Found:
    """A valid negative tier and how it was found."""

    text: str
    round: int
    p_contradiction: float
    p_negative_entails_parent: float | None = None
    p_parent_entails_negative: float | None = None


def negative_prompts(positive: Sequence[str]) -> list[str]:
    """The four forward prompts ``→``, ``T1 →``, ``T1 → T2 →``, ``T1 → T2 → T3 →``."""
    return [completer_prompt(positive[:i], FORWARD) for i in range(N_TIERS)]


def check_negatives(
    candidates: Sequence[tuple[Sequence[str], int, str]], scorer: Any, rejected: Counter[str]
) -> list[_Found | None]:
    """Validate hallucinated tiers ``(positive tiers, i (0-based), T'_i)``, batched.

    Returns the accepted :class:`_Found` (round left at 0) or ``None`` per candidate and counts
    each rejection's reason into ``rejected``.
    """
    results: list[_Found | None] = [None] * len(candidates)
    live = []
    for k, (_, _, text) in enumerate(candidates):
        if text:
            live.append(k)
        else:
            rejected[Rejection.EMPTY_TIER.value] += 1
    contradiction = contradicts(scorer, [(candidates[k][0][candidates[k][1]], candidates[k][2]) for k in live])
    contradicting = []
    for k, ok, p in zip(live, contradiction.ok, contradiction.p_contradiction):
        if not ok:
            rejected[Rejection.NOT_CONTRADICTING.value] += 1
        elif candidates[k][1] == 0:
            results[k] = _Found(candidates[k][2], 0, float(p))
        else:
            contradicting.append((k, float(p)))
    child = entailed_not_entailing(
        scorer, [(candidates[k][0][candidates[k][1] - 1], candidates[k][2]) for k, _ in contradicting]
    )
    for (k, p_c), ok, up, down in zip(
        contradicting, child.ok, child.p_specific_entails_general, child.p_general_entails_specific
    ):
        if ok:
            results[k] = _Found(candidates[k][2], 0, p_c, float(up), float(down))
        else:
            rejected[Rejection.NOT_ENTAILED.value] += 1
    return results


def hallucinate_negatives(
    rows: Sequence[dict[str, Any]] | Any,
    completer: TextGenerator,
    scorer: Any,
    settings: NegativeSettings = NegativeSettings(),
) -> tuple[list[dict[str, Any]], StageStats]:
    """Add ``negative`` = [N1..N4] to every row whose four negatives are found in ``rounds`` rounds.

    ``rows``: dicts (or a ``datasets.Dataset``) with ``positive`` = [T1..T4]. Returns the
    complete rows in input order (provenance gains ``"negatives"``: completer, NLI model, and
    per tier the round and probabilities) and the stage stats (``extra``: the throughput
    counters of :mod:`hierarcaps.stats`, ``candidates_<reason>`` per rejected hallucinated tier).
    """
    items = as_rows(rows)
    for number, row in enumerate(items):
        positive = row.get("positive")
        if not isinstance(positive, (list, tuple)) or len(positive) != N_TIERS:
            raise ValueError(f"row {number} needs 'positive' with {N_TIERS} tiers (run positive completion first)")
    stats = StageStats(stage="negatives", items_in=len(items))
    before = work_counters(completer, scorer)
    rejected: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    with stats.timed():
        for batch_no, batch in enumerate(chunks(items, settings.batch_size)):
            found = _hallucinate_batch(batch, completer, scorer, settings, batch_no, rejected)
            for row, tiers in zip(batch, found):
                if any(t is None for t in tiers):
                    stats.reject(INCOMPLETE_NEGATIVE_CHAIN)
                    continue
                out.append(_negative_row(row, tiers, completer, scorer, settings))
    stats.kept = len(out)
    record_work(stats, before, completer, scorer)
    stats.extra.update({f"candidates_{reason}": n for reason, n in sorted(rejected.items())})
    return out, stats


def _hallucinate_batch(
    batch: Sequence[dict[str, Any]],
    completer: TextGenerator,
    scorer: Any,
    settings: NegativeSettings,
    batch_no: int,
    rejected: Counter[str],
) -> list[list[_Found | None]]:
    """Rounds of generation and checks for one batch; per item the found tiers (``None`` = missing)."""
    positives = [list(row["positive"]) for row in batch]
    prompts = [negative_prompts(p) for p in positives]
    found: list[list[_Found | None]] = [[None] * N_TIERS for _ in batch]
    for round_no in range(settings.rounds):
        missing = [(item, i) for item in range(len(batch)) for i in range(N_TIERS) if found[item][i] is None]
        if not missing:
            break
        outputs = completer.generate(
            [prompts[item][i] for item, i in missing],
            num_return_sequences=1,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=[FORWARD],
            seed=call_seed(settings.seed, batch_no, round_no),
        )
        candidates = [(positives[item], i, first_tier(text, FORWARD)) for (item, i), (text,) in zip(missing, outputs)]
        for (item, i), result in zip(missing, check_negatives(candidates, scorer, rejected)):
            if result is not None:
                result.round = round_no
                found[item][i] = result
    return found


def _negative_row(
    row: dict[str, Any], tiers: list[_Found | None], completer: TextGenerator, scorer: Any, settings: NegativeSettings
) -> dict[str, Any]:
    provenance = load_provenance(row)
    provenance["negatives"] = {
        "completer": model_id(completer),
        "nli_model": model_id(scorer),
        "seed": settings.seed,
        "temperature": settings.temperature,
        "rounds": [t.round for t in tiers],
        "p_contradiction": [round(t.p_contradiction, 6) for t in tiers],
        "p_negative_entails_parent": [None if t.p_negative_entails_parent is None else round(t.p_negative_entails_parent, 6) for t in tiers],
        "p_parent_entails_negative": [None if t.p_parent_entails_negative is None else round(t.p_parent_entails_negative, 6) for t in tiers],
    }
    return {**row, "negative": [t.text for t in tiers], "provenance": dump(provenance)}
