"""Few-shot augmentation (SPEC section 2 step 3; HierarCaps paper, supplementary B.1).

The base (not instruction-tuned) LLM sees ``shots`` randomly chosen seed hierarchies, one per
line, and writes one more line; sampling stops at the newline (the paper: "generate text until
another newline is predicted"). A sample that ran out of ``max_new_tokens`` before its newline
(or end of sequence) is a cut-off line and is dropped as ``unfinished_line``, whatever it looks
like. Finished lines with exactly four non-empty tiers are kept, without any NLI filter (as in
the paper); a line equal to a seed or to an earlier output is dropped as a ``duplicate``. This
repeats, ``batch_size`` few-shot prompts per generate call (each with its own random choice of
seeds), until ``target_count`` hierarchies are kept.

Lines are written in the release format ``T1 => T2 => T3 => T4`` (the authors' released
files use it): an ASCII delimiter that every LLM tokenizer handles, unlike ``→``.

``max_calls`` bounds the generate calls; when it is ``None`` the bound is ten times the calls
a 100 % acceptance rate would need, so a model that writes nothing usable cannot loop forever
(``stats.extra["stopped_early"]`` is then 1).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from hierarcaps.generation import TextGenerator
from hierarcaps.hierarchy import N_TIERS, RELEASE_DELIMITER, Rejection, normalize_text
from hierarcaps.stages._common import call_seed, record_work, work_counters
from hierarcaps.stats import StageStats

UNFINISHED_LINE = "unfinished_line"
NOT_FOUR_TIERS = "not_four_tiers"
DUPLICATE = "duplicate"

#: Generate calls allowed per call a fully accepting model would need (``max_calls=None``).
CALL_BUDGET_FACTOR = 10


@dataclass
class AugmentSettings:
    """Settings of few-shot augmentation (paper: Llama-2-13b, temperature 1.0, ~10K outputs).

    ``top_k``/``top_p`` filter the sampled tokens; ``None`` (default) is the paper's plain
    temperature sampling.
    """

    target_count: int = 10000
    shots: int = 10
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 96
    batch_size: int = 16
    seed: int = 0
    max_calls: int | None = None


def format_line(tiers: Sequence[str]) -> str:
    """One few-shot line: ``T1 => T2 => T3 => T4``."""
    return RELEASE_DELIMITER.join(tiers)


def parse_line(text: str) -> tuple[tuple[str, ...] | None, str | None]:
    """``(tiers, None)`` for a generated line with exactly four non-empty tiers, else ``(None, reason)``."""
    tiers = tuple(normalize_text(t) for t in text.split(RELEASE_DELIMITER.strip()))
    if len(tiers) != N_TIERS:
        return None, NOT_FOUR_TIERS
    if not all(tiers):
        return None, Rejection.EMPTY_TIER.value
    return tiers, None


def few_shot_prompt(seeds: Sequence[Sequence[str]], rng: random.Random, shots: int) -> str:
    """``shots`` distinct random seeds, one per line, ending with a newline for the next line."""
    chosen = rng.sample(range(len(seeds)), min(shots, len(seeds)))
    return "".join(format_line(seeds[i]) + "\n" for i in chosen)


def augment_hierarchies(
    seed_tiers: Sequence[Sequence[str]],
    generator: TextGenerator,
    settings: AugmentSettings = AugmentSettings(),
) -> tuple[list[dict[str, Any]], StageStats]:
    """Generate ``target_count`` synthetic hierarchies from few-shot prompts of seed hierarchies.

    Returns rows ``{"tiers": [T1, T2, T3, T4]}`` and stats whose ``items_in`` counts the
    generated lines read (``extra``: the generator's throughput counters, ``seed_hierarchies``,
    ``stopped_early``, ``lines_after_target``: lines of the last call left unread).
    """
    if not seed_tiers:
        raise ValueError("augmentation needs at least one seed hierarchy; the seeds stage kept none")
    seeds = [tuple(normalize_text(t) for t in tiers) for tiers in seed_tiers]
    seen = set(seeds)
    rng = random.Random(settings.seed)
    max_calls = settings.max_calls
    if max_calls is None:
        max_calls = CALL_BUDGET_FACTOR * math.ceil(settings.target_count / settings.batch_size)
    stats = StageStats(stage="augment")
    rows: list[dict[str, Any]] = []
    calls = 0
    before = work_counters(generator)
    with stats.timed():
        while len(rows) < settings.target_count and calls < max_calls:
            prompts = [few_shot_prompt(seeds, rng, settings.shots) for _ in range(settings.batch_size)]
            outputs = generator.generate_with_status(
                prompts,
                num_return_sequences=1,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens,
                stop_at_newline=True,
                seed=call_seed(settings.seed, calls),
            )
            calls += 1
            for n_read, ((line,), (finished,)) in enumerate(zip(outputs.texts, outputs.finished)):
                if len(rows) == settings.target_count:
                    stats.extra["lines_after_target"] = len(outputs.texts) - n_read
                    break
                stats.items_in += 1
                tiers, reason = parse_line(line) if finished else (None, UNFINISHED_LINE)
                if tiers is not None and tiers in seen:
                    reason = DUPLICATE
                if reason is not None:
                    stats.reject(reason)
                    continue
                seen.add(tiers)
                rows.append({"tiers": list(tiers)})
    stats.kept = len(rows)
    record_work(stats, before, generator)
    stats.extra.update(
        seed_hierarchies=len(seeds),
        stopped_early=int(len(rows) < settings.target_count),
    )
    return rows, stats
