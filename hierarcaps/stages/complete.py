"""Positive completion (SPEC section 2 step 5; HierarCaps paper, supplementary B.1).

For each caption C = T4 the completer gets ``T4 ←`` and samples ``num_candidates`` (64)
candidates. One generate call covers ``batch_size`` captions (``batch_size x 64`` sequences).
Each candidate is parsed with ``split_chain(text, "←")`` and checked structurally first, cheapest
first (:func:`hierarcaps.hierarchy.check_completion`: exactly three tiers ``T3 ← T2 ← T1``, no
empty tier, adjacent tiers differ, T3 at least 2 words and 10 characters shorter than T4).
Only survivors reach the NLI model: each adjacent pair (T1,T2), (T2,T3), (T3,T4) must pass the
entailment test (:func:`hierarcaps.nli.entailed_not_entailing`). The caption keeps the first
candidate in sample order that passes everything.

NLI runs in *waves* so that a caption whose first survivors pass does not pay for its other
60-odd candidates: wave w scores, for every caption of the batch still undecided, its next
``nli_wave`` survivors, in one call for the pairs no earlier wave decided. Because survivors
are tried in sample order and a caption stops at its first valid one, the accepted candidate
is exactly the one an all-at-once check would accept.

A caption without an accepted candidate is dropped; its reason in the stats is
``not_entailed`` when some candidate reached the NLI test, else the most frequent structural
reason among its candidates. ``stats.extra`` also counts candidates per reason
(``candidates_<reason>``) and the throughput counters (:data:`hierarcaps.stats.THROUGHPUT_COUNTERS`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from hierarcaps.generation import TextGenerator
from hierarcaps.hierarchy import BACKWARD, Rejection, check_completion, completer_prompt, normalize_text, split_chain
from hierarcaps.nli import entailed_not_entailing
from hierarcaps.stages._common import (
    as_rows, call_seed, chunks, dump, load_provenance, model_id, record_work, rounded, work_counters,
)
from hierarcaps.stats import StageStats

Candidate = tuple[int, list[str]]  # (sample index, [T1, T2, T3, T4])


@dataclass
class CompleteSettings:
    """Settings of positive completion (paper: 64 candidates, temperature 1.0).

    ``batch_size`` is the number of captions per generate call; ``nli_wave`` the number of
    structurally valid candidates per caption sent to the NLI model at a time.
    ``top_k``/``top_p`` filter the sampled tokens; ``None`` (default) is the paper's plain
    temperature sampling.
    """

    num_candidates: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 96
    batch_size: int = 8
    seed: int = 0
    nli_wave: int = 8


def structural_survivors(caption: str, continuations: Sequence[str], rejected: Counter[str]) -> list[Candidate]:
    """Candidates passing the structural checks, in sample order, as full chains T1..T4.

    Counts every failed candidate's reason into ``rejected``.
    """
    survivors = []
    for index, text in enumerate(continuations):
        tiers = split_chain(text, BACKWARD)
        reason = check_completion(caption, tiers)
        if reason is not None:
            rejected[reason.value] += 1
            continue
        t3, t2, t1 = tiers
        survivors.append((index, [t1, t2, t3, caption]))
    return survivors


def adjacent_pairs(tiers: Sequence[str]) -> list[tuple[str, str]]:
    """(general, specific) pairs (T1,T2), (T2,T3), (T3,T4)."""
    return list(zip(tiers[:-1], tiers[1:]))


def select_first_valid(
    survivors: list[list[Candidate]], scorer: Any, wave: int
) -> list[tuple[Candidate, dict[str, list[float]]] | None]:
    """Per caption, the first survivor whose adjacent pairs all pass the entailment test.

    Runs in waves of ``wave`` survivors per undecided caption; each wave makes one NLI call
    for the pairs no earlier wave decided (de-duplicated). Returns ``(candidate,
    probabilities)`` or ``None`` per caption.
    """
    chosen: list[tuple[Candidate, dict[str, list[float]]] | None] = [None] * len(survivors)
    known: dict[tuple[str, str], tuple[bool, float, float]] = {}  # pair -> (ok, p_up, p_down)
    offset = 0
    while True:
        pending = [(c, s[offset:offset + wave]) for c, s in enumerate(survivors) if chosen[c] is None]
        pending = [(c, cands) for c, cands in pending if cands]
        if not pending:
            return chosen
        pairs = (p for _, cands in pending for _, tiers in cands for p in adjacent_pairs(tiers))
        new = [p for p in dict.fromkeys(pairs) if p not in known]
        if new:
            decision = entailed_not_entailing(scorer, new)
            known.update(zip(new, zip(decision.ok.tolist(), decision.p_specific_entails_general.tolist(),
                                      decision.p_general_entails_specific.tolist())))
        for c, cands in pending:
            for candidate in cands:
                verdicts = [known[p] for p in adjacent_pairs(candidate[1])]
                if all(ok for ok, _, _ in verdicts):
                    chosen[c] = (candidate, {
                        "p_specific_entails_general": rounded(up for _, up, _ in verdicts),
                        "p_general_entails_specific": rounded(down for _, _, down in verdicts),
                    })
                    break
        offset += wave


def complete_positives(
    rows: Sequence[dict[str, Any]] | Any,
    completer: TextGenerator,
    scorer: Any,
    settings: CompleteSettings = CompleteSettings(),
) -> tuple[list[dict[str, Any]], StageStats]:
    """Complete every caption to a positive hierarchy; keep those with a valid candidate.

    ``rows``: dicts (or a ``datasets.Dataset``) with at least ``caption``. Returns the kept rows
    with ``positive`` = [T1, T2, T3, T4] (T4 = the caption) and ``provenance`` (JSON: the
    previous provenance plus ``"complete"``: completer, NLI model, candidate index, seed,
    entailment probabilities), in input order, and the stage stats.
    """
    items = as_rows(rows)
    for number, row in enumerate(items):
        if not isinstance(row.get("caption"), str):
            raise KeyError(f"row {number} has no 'caption' text to complete (keys: {sorted(row)})")
    stats = StageStats(stage="complete", items_in=len(items))
    before = work_counters(completer, scorer)
    candidate_rejections: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    with stats.timed():
        for batch_no, batch in enumerate(chunks(items, settings.batch_size)):
            captions = [normalize_text(row["caption"]) for row in batch]
            seed = call_seed(settings.seed, batch_no)
            samples = completer.generate(
                [completer_prompt([c], BACKWARD) for c in captions],
                num_return_sequences=settings.num_candidates,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens,
                seed=seed,
            )
            per_caption: list[Counter[str]] = [Counter() for _ in batch]
            survivors = [structural_survivors(c, s, r) for c, s, r in zip(captions, samples, per_caption)]
            chosen = select_first_valid(survivors, scorer, settings.nli_wave)
            for row, found, surv, rejected in zip(batch, chosen, survivors, per_caption):
                candidate_rejections.update(rejected)
                if found is None:
                    stats.reject(Rejection.NOT_ENTAILED.value if surv else rejected.most_common(1)[0][0])
                    continue
                (index, tiers), probabilities = found
                provenance = load_provenance(row)
                provenance["complete"] = {
                    "completer": model_id(completer),
                    "nli_model": model_id(scorer),
                    "candidate_index": index,
                    "structural_survivors": len(surv),
                    "seed": seed,
                    "temperature": settings.temperature,
                    "nli": probabilities,
                }
                out.append({**row, "positive": tiers, "provenance": dump(provenance)})
    stats.kept = len(out)
    record_work(stats, before, completer, scorer)
    stats.extra.update({f"candidates_{reason}": n for reason, n in sorted(candidate_rejections.items())})
    return out, stats
