"""Seed generation (SPEC section 2 step 2; HierarCaps paper, supplementary B.1).

Each caption is T4. Three chat prompts are applied in turn (``prompts/seed_*.txt``, the
paper's Fig. 7): *shorten the caption* gives T3 from T4, *fill in "A picture of (a/the) ___"*
gives T2 from T3, *what general concept includes* gives T1 from T2. Every step runs over all
captions still alive, in batched generate calls of ``batch_size`` prompts. The answer is the
text inside the first quotation of the model's continuation (when the partial answer already
opened a quotation, the text up to its closing mark); a quotation opened with ``"`` closes with
``"`` or ``”`` (models mix a straight opening with a curly closing mark), one opened with ``“``
with ``”``, and it must close on the line it opened (a real model
that never closes its quote rambles on for lines). An answer without a quotation is rejected
(``no_quoted_text``), and so is one without a standard alphanumeric character
(``no_alphanumeric``). Answers lose trailing sentence punctuation (models write
``"goat on island."``), and the blank-filling answer also the template's `` .``. Since the
quotation must close on its line, a prompt whose partial answer opens it stops sampling at
the first newline. The completed hierarchies then pass one all-pairs entailment filter
(``hierarchy_entailment`` with every pair i < j, all hierarchies in one scorer call): T_i must
be entailed by T_j and not entail it.

With ``attempts > 1`` the captions that failed are tried again with fresh samples; a caption's
rejection reason in the stats is that of its last attempt, so ``kept + sum(rejected) ==
items_in``. Each seed's ``provenance`` records the prompts, the attempt, the raw answers and
the NLI probabilities it was accepted on.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from hierarcaps.generation import TextGenerator
from hierarcaps.hierarchy import Rejection, normalize_text
from hierarcaps.nli import hierarchy_entailment
from hierarcaps.prompting import SEED_PROMPTS, ChatPrompt, load_prompt, render_prompts
from hierarcaps.stages._common import call_seed, chunks, dump, model_id, record_work, rounded, work_counters
from hierarcaps.stats import StageStats

NO_QUOTED_TEXT = "no_quoted_text"
NO_ALPHANUMERIC = "no_alphanumeric"

#: Opening quotation marks and the marks that close each: a straight opening closes with a
#: straight or a curly mark, a curly opening with a curly one.
_CLOSING_QUOTE = {'"': re.compile('["”]'), "“": re.compile("”")}
_OPENING_QUOTE = re.compile('["“]')
#: The end of an answer whose opening quote was in the partial answer (ours is straight).
_OPEN_QUOTATION_END = re.compile(r'["”\n]')
_ALPHANUMERIC = re.compile(r"[A-Za-z0-9]")
#: Trailing characters that are sentence punctuation, not part of a tier.
_TRAILING_PUNCTUATION = " .,;:"


@dataclass
class SeedSettings:
    """Settings of seed generation (paper: Llama-2-13b-chat, temperature 1.2, one attempt).

    ``top_k``/``top_p`` filter the sampled tokens; ``None`` (default) is the paper's plain
    temperature sampling.
    """

    temperature: float = 1.2
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 64
    attempts: int = 1
    batch_size: int = 16
    seed: int = 0


def extract_quoted(continuation: str, quote_open: bool) -> str | None:
    """The quoted answer in a model continuation, or ``None`` when there is none.

    ``quote_open``: the partial answer ended inside an open (straight) quotation, so the answer
    is the text up to the first closing mark, ``"`` or ``”``. Otherwise it is the text of the
    first quotation, ``"..."``, ``"...”`` or ``“...”``. Either way the quotation must close before the
    line ends; a first quotation mark that closes nothing (a stray closing mark) means no answer.
    """
    if quote_open:
        end = _OPEN_QUOTATION_END.search(continuation)
        if end is None or end.group() == "\n":
            return None
        return normalize_text(continuation[:end.start()])
    opening = _OPENING_QUOTE.search(continuation)
    if opening is None:
        return None
    line_end = continuation.find("\n", opening.end())
    line = continuation[opening.end():line_end if line_end != -1 else None]
    closing = _CLOSING_QUOTE[opening.group()].search(line)
    return normalize_text(line[:closing.start()]) if closing else None


def clean_answer(answer: str) -> str:
    """Drop trailing sentence punctuation (the blank-filling answer ends with the template's `` .``)."""
    return normalize_text(answer.rstrip(_TRAILING_PUNCTUATION))


def parse_answer(prompt: ChatPrompt, continuation: str) -> tuple[str | None, str | None]:
    """``(tier, None)`` for a usable answer, else ``(None, rejection reason)``."""
    quoted = extract_quoted(continuation, prompt.answer_opens_quote)
    if quoted is None:
        return None, NO_QUOTED_TEXT
    tier = clean_answer(quoted)
    if not _ALPHANUMERIC.search(tier):
        return None, NO_ALPHANUMERIC
    return tier, None


def generate_seeds(
    captions: Sequence[str],
    generator: TextGenerator,
    scorer: Any,
    settings: SeedSettings = SeedSettings(),
) -> tuple[list[dict[str, Any]], StageStats]:
    """Build seed hierarchies from captions (T4) with the three chat prompts and the NLI filter.

    Returns rows ``{"tiers": [T1, T2, T3, T4], "caption": T4, "provenance": json}`` in caption
    order, and the stage stats (``extra``: the throughput counters of :mod:`hierarcaps.stats`,
    ``rejected_attempts``).
    """
    stats = StageStats(stage="seeds", items_in=len(captions))
    prompts = [load_prompt(name) for name in SEED_PROMPTS]
    before = work_counters(generator, scorer)
    accepted: dict[int, dict[str, Any]] = {}
    last_reason: dict[int, str] = {}
    with stats.timed():
        for attempt in range(settings.attempts):
            pending = [i for i in range(len(captions)) if i not in accepted]
            if not pending:
                break
            chains, raw, failed = _run_prompts(captions, pending, prompts, generator, settings, attempt)
            last_reason.update(failed)
            survivors = sorted(chains)
            decisions = hierarchy_entailment(scorer, [chains[i] for i in survivors], adjacent_only=False)
            for i, decision in zip(survivors, decisions):
                if not decision.ok:
                    last_reason[i] = Rejection.NOT_ENTAILED.value
                    continue
                accepted[i] = _seed_row(chains[i], raw[i], decision, attempt, generator, scorer, settings)
                last_reason.pop(i, None)
            failed_now = sum(1 for i in pending if i not in accepted)
            stats.extra["rejected_attempts"] = stats.extra.get("rejected_attempts", 0) + failed_now
    for reason in last_reason.values():
        stats.reject(reason)
    rows = [accepted[i] for i in sorted(accepted)]
    stats.kept = len(rows)
    record_work(stats, before, generator, scorer)
    return rows, stats


def _run_prompts(
    captions: Sequence[str],
    pending: list[int],
    prompts: list[ChatPrompt],
    generator: TextGenerator,
    settings: SeedSettings,
    attempt: int,
) -> tuple[dict[int, list[str]], dict[int, list[str]], dict[int, str]]:
    """Apply the prompts in turn to the pending captions, batched across captions.

    Returns the complete chains ``{caption index: [T1, T2, T3, T4]}``, the raw continuations
    per caption (prompt order) and the rejection reason of every caption that dropped out.
    """
    texts = {i: normalize_text(captions[i]) for i in pending}  # current (most general) tier
    chains = {i: [texts[i]] for i in pending}  # built specific -> general
    raw: dict[int, list[str]] = {i: [] for i in pending}
    failed: dict[int, str] = {}
    for step, prompt in enumerate(prompts):
        alive = [i for i in pending if i not in failed]
        for batch_no, batch in enumerate(chunks(alive, settings.batch_size)):
            inputs = render_prompts(generator.tokenizer, prompt, [texts[i] for i in batch])
            outputs = generator.generate(
                inputs,
                num_return_sequences=1,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens,
                stop_at_newline=prompt.answer_opens_quote,  # the answer closes on its line
                seed=call_seed(settings.seed, attempt, step, batch_no),
            )
            for i, (continuation,) in zip(batch, outputs):
                raw[i].append(continuation)
                tier, reason = parse_answer(prompt, continuation)
                if reason is not None:
                    failed[i] = reason
                    continue
                texts[i] = tier
                chains[i].append(tier)
    complete = {i: chain[::-1] for i, chain in chains.items() if i not in failed}
    return complete, raw, failed


def _seed_row(
    tiers: list[str],
    raw: list[str],
    decision: Any,
    attempt: int,
    generator: TextGenerator,
    scorer: Any,
    settings: SeedSettings,
) -> dict[str, Any]:
    provenance = {
        "stage": "seeds",
        "generator": model_id(generator),
        "nli_model": model_id(scorer),
        "prompts": list(SEED_PROMPTS),
        "attempt": attempt,
        "settings": asdict(settings),
        "raw_answers": raw,
        "nli": {
            "pairs": [list(p) for p in decision.pairs],
            "p_forward": rounded(decision.p_forward),
            "p_backward": rounded(decision.p_backward),
        },
    }
    return {"tiers": tiers, "caption": tiers[-1], "provenance": dump(provenance)}
