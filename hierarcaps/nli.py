"""Batched natural-language-inference scoring and the entailment decisions of the build.

SPEC section 2, *NLI convention*: ``p_e(a ⇒ b)`` is the NLI model's entailment probability with
premise ``a`` and hypothesis ``b``, ``p_c(a, b)`` its contradiction probability, and every text
is wrapped as ``a picture of: "{}"`` first. "a is entailed by b and does not entail it" means
``p_e(b ⇒ a) > 0.5`` and ``p_e(a ⇒ b) < 0.5``.

:class:`NLIScorer` turns a list of ``(premise, hypothesis)`` pairs into three probability
arrays. It scores each distinct pair once: pairs already seen come from an in-memory cache or
an optional on-disk SQLite cache keyed by (model and its dtype, template, premise, hypothesis), so
scores of a bf16 run never answer a float32 run; the rest are tokenized once, sorted by token
length (to reduce padding) and run through the model one forward pass per batch. A batch holds
at most ``batch_size`` pairs and, when ``max_batch_tokens`` is set, at most that many padded
tokens (pairs x longest pair): short captions fill the GPU, long ones cannot run it out of
memory. The label order comes from ``config.id2label``, never assumed.

The decision helpers are plain functions over any object with ``score(pairs) -> NLIScores``
(so stages can be tested with a scorer double): :func:`entailed_not_entailing` for
(general, specific) pairs, :func:`hierarchy_entailment` for whole hierarchies (every pair
i < j, or adjacent pairs only) and :func:`contradicts`. Each makes exactly one ``score`` call
and returns the probabilities it decided on, for provenance.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

from hierarcaps.models import ModelSpec, load_nli, model_provenance_id, nli_label_indices

# numpy and torch are imported by the functions that score, not here: the stage settings that
# every command reads live in modules that import this one.
if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_TEMPLATE",
    "ContradictionDecision",
    "EntailmentDecision",
    "HierarchyDecision",
    "NLIScorer",
    "NLIScores",
    "contradicts",
    "entailed_not_entailing",
    "hierarchy_entailment",
    "tier_pairs",
]

DEFAULT_TEMPLATE = 'a picture of: "{}"'
THRESHOLD = 0.5
Pair = tuple[str, str]


@dataclass(frozen=True)
class NLIScores:
    """Label probabilities of N (premise, hypothesis) pairs, each a float64 array of shape (N,)."""

    entailment: np.ndarray
    neutral: np.ndarray
    contradiction: np.ndarray

    def __len__(self) -> int:
        return len(self.entailment)


class Scorer(Protocol):
    """Anything the decision helpers can ask for NLI probabilities."""

    def score(self, pairs: Sequence[Pair]) -> NLIScores: ...


class _DiskCache:
    """SQLite table of scored pairs, one row per (model, template, premise, hypothesis).

    The ``model`` column holds :attr:`NLIScorer.cache_key` (model id and dtype).
    """

    _LOOKUP_CHUNK = 400  # pairs per SELECT: 2 parameters each, well under SQLite's limit

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several stage processes may share one cache file: wait for locks instead of failing.
        # check_same_thread off: a flow may call the scorer from a worker thread; calls are serial.
        self.connection = sqlite3.connect(str(path), timeout=60.0, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS nli_scores (model TEXT NOT NULL, template TEXT NOT NULL, "
            "premise TEXT NOT NULL, hypothesis TEXT NOT NULL, entailment REAL NOT NULL, "
            "neutral REAL NOT NULL, contradiction REAL NOT NULL, "
            "PRIMARY KEY (model, template, premise, hypothesis))"
        )
        self.connection.commit()

    def lookup(self, model: str, template: str, pairs: list[Pair]) -> dict[Pair, tuple[float, float, float]]:
        found: dict[Pair, tuple[float, float, float]] = {}
        for start in range(0, len(pairs), self._LOOKUP_CHUNK):
            chunk = pairs[start : start + self._LOOKUP_CHUNK]
            values = ",".join("(?,?)" for _ in chunk)
            rows = self.connection.execute(
                "SELECT premise, hypothesis, entailment, neutral, contradiction FROM nli_scores "
                f"WHERE model = ? AND template = ? AND (premise, hypothesis) IN (VALUES {values})",
                [model, template, *(text for pair in chunk for text in pair)],
            )
            for premise, hypothesis, e, n, c in rows:
                found[(premise, hypothesis)] = (e, n, c)
        return found

    def store(self, model: str, template: str, scored: dict[Pair, tuple[float, float, float]]) -> None:
        with self.connection:  # one transaction per batch
            self.connection.executemany(
                "INSERT OR REPLACE INTO nli_scores VALUES (?,?,?,?,?,?,?)",
                [(model, template, p, h, *probs) for (p, h), probs in scored.items()],
            )

    def close(self) -> None:
        self.connection.close()


def _model_dtype(model: Any) -> str:
    """The dtype the model computes in (``float32``, ``bfloat16``, ...), plus its quantization if any."""
    dtype = str(getattr(model, "dtype", None) or next(model.parameters()).dtype).removeprefix("torch.")
    spec: ModelSpec | None = getattr(model, "hierarcaps_spec", None)
    return f"{dtype}+{spec.quantization}" if spec is not None and spec.quantization else dtype


class NLIScorer:
    """Score (premise, hypothesis) pairs with a 3-way NLI sequence classifier.

    Args:
        model: a ``*ForSequenceClassification`` whose ``config.id2label`` names entailment,
            neutral and contradiction (any case, any order).
        tokenizer: its tokenizer; pairs are encoded as (premise, hypothesis).
        template: format string each text is wrapped in before scoring.
        batch_size: at most this many pairs per forward pass.
        max_batch_tokens: at most this many padded tokens (pairs x longest pair) per forward
            pass; ``None`` or 0: batches of ``batch_size`` pairs. A pair longer than the budget
            runs alone.
        cache_path: optional SQLite file shared across runs and processes.
        model_id: cache key and provenance name; default ``id@revision`` (hub) or
            ``name#sha256:<content hash>`` (local folder, so a changed folder does not hit stale
            scores, and the name says nothing of where the folder lies).

    Counters: ``forward_calls`` (model forward passes), ``pairs_scored`` (pairs run through
    the model), ``cache_hits`` (distinct pairs answered from a cache), ``padded_tokens``
    (tokens of all batches, padding included). The cache key (:attr:`cache_key`) is
    ``model_id`` plus the model's dtype.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 64,
        max_batch_tokens: int | None = None,
        cache_path: str | Path | None = None,
        model_id: str | None = None,
    ) -> None:
        if "{}" not in template:
            raise ValueError(f"NLI template {template!r} must contain {{}} where the text goes")
        if batch_size < 1:
            raise ValueError(f"NLI batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 0:
            raise ValueError(f"NLI max_batch_tokens must be >= 0 (0: no budget), got {max_batch_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens or None
        self.model_id = model_id or model_provenance_id(model)
        labels = nli_label_indices(model.config, f"NLI model {self.model_id!r}")
        self.cache_key = f"{self.model_id}|{_model_dtype(model)}"
        self._label_index = [labels["entailment"], labels["neutral"], labels["contradiction"]]
        self._memory: dict[Pair, tuple[float, float, float]] = {}
        self._disk = _DiskCache(Path(cache_path)) if cache_path is not None else None
        self.forward_calls = 0
        self.pairs_scored = 0
        self.cache_hits = 0
        self.padded_tokens = 0

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kwargs: Any) -> "NLIScorer":
        """Load the model of ``spec`` (:func:`hierarcaps.models.load_nli`) and wrap it.

        ``batch_size`` defaults to ``spec.batch_size`` (when set); other keyword arguments as in the class.
        """
        model, tokenizer = load_nli(spec)
        if spec.batch_size is not None:
            kwargs.setdefault("batch_size", spec.batch_size)
        return cls(model, tokenizer, **kwargs)

    def score(self, pairs: Sequence[Pair]) -> NLIScores:
        """Probabilities of each (premise, hypothesis) pair, in input order; shapes (N,)."""
        import numpy as np

        keys = [(str(premise), str(hypothesis)) for premise, hypothesis in pairs]
        missing = [key for key in dict.fromkeys(keys) if key not in self._memory]
        if missing and self._disk is not None:
            found = self._disk.lookup(self.cache_key, self.template, missing)
            self._memory.update(found)
            missing = [key for key in missing if key not in found]
        self.cache_hits += len(set(keys)) - len(missing)
        encoded = self._encode(missing) if missing else None
        for batch in self._batches([len(ids) for ids in encoded["input_ids"]] if encoded else []):
            scored = dict(zip([missing[i] for i in batch], self._forward(encoded, batch)))
            self._memory.update(scored)
            if self._disk is not None:
                self._disk.store(self.cache_key, self.template, scored)
        table = np.array([self._memory[key] for key in keys], dtype=np.float64).reshape(len(keys), 3)
        return NLIScores(entailment=table[:, 0], neutral=table[:, 1], contradiction=table[:, 2])

    def _encode(self, pairs: list[Pair]) -> Any:
        """Tokenize every pair once, unpadded (truncated to the model's maximum length)."""
        return self.tokenizer(
            [self.template.format(premise) for premise, _ in pairs],
            [self.template.format(hypothesis) for _, hypothesis in pairs],
            truncation=True,
        )

    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Indices of pairs by token length, cut into batches within ``batch_size`` and ``max_batch_tokens``.

        Sorted by length, each batch pads to similar lengths; a batch's padded size is its
        pair count times its longest pair (the last, as lengths ascend).
        """
        batch: list[int] = []
        for index in sorted(range(len(lengths)), key=lengths.__getitem__):
            padded = (len(batch) + 1) * lengths[index]
            if batch and (len(batch) == self.batch_size or (self.max_batch_tokens and padded > self.max_batch_tokens)):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def _forward(self, encoded: Any, batch: list[int]) -> list[tuple[float, float, float]]:
        """One forward pass over the pairs ``batch`` (indices into ``encoded``): (e, n, c) per pair."""
        import torch

        features = [{key: values[i] for key, values in encoded.items()} for i in batch]
        padded = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(**padded.to(device)).logits
        # Softmax in float32: bf16/fp16 logits lose precision near the 0.5 decision threshold.
        probs = logits.float().softmax(dim=-1)[:, self._label_index].cpu().numpy()
        self.forward_calls += 1
        self.pairs_scored += len(batch)
        self.padded_tokens += int(padded["input_ids"].numel())
        return [tuple(float(p) for p in row) for row in probs]

    def close(self) -> None:
        """Close the on-disk cache (scores already written stay there)."""
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def __enter__(self) -> "NLIScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class EntailmentDecision:
    """For N (general, specific) pairs: ok iff p_e(specific ⇒ general) > 0.5 and p_e(general ⇒ specific) < 0.5."""

    ok: np.ndarray  # bool (N,)
    p_specific_entails_general: np.ndarray  # float (N,)
    p_general_entails_specific: np.ndarray  # float (N,)


@dataclass(frozen=True)
class HierarchyDecision:
    """One hierarchy's entailment check.

    ``pairs`` are tier index pairs (i, j), i < j (i the more general tier); for each,
    ``p_forward`` is p_e(T_j ⇒ T_i) (must exceed 0.5: the specific tier entails the general
    one) and ``p_backward`` is p_e(T_i ⇒ T_j) (must stay below 0.5). ``ok`` iff every pair passes.
    """

    ok: bool
    pairs: list[tuple[int, int]]
    p_forward: list[float]
    p_backward: list[float]


@dataclass(frozen=True)
class ContradictionDecision:
    """For N (a, b) pairs: ok iff p_c(a, b) > 0.5."""

    ok: np.ndarray  # bool (N,)
    p_contradiction: np.ndarray  # float (N,)


def entailed_not_entailing(scorer: Scorer, pairs: Sequence[tuple[str, str]]) -> EntailmentDecision:
    """Is each ``general`` entailed by its ``specific`` and not entailing it? One ``score`` call."""
    import numpy as np

    n = len(pairs)
    queries = [(specific, general) for general, specific in pairs] + [(general, specific) for general, specific in pairs]
    entailment = scorer.score(queries).entailment if queries else np.zeros(0)
    up, down = np.asarray(entailment[:n], dtype=np.float64), np.asarray(entailment[n:], dtype=np.float64)
    return EntailmentDecision(ok=(up > THRESHOLD) & (down < THRESHOLD),
                              p_specific_entails_general=up, p_general_entails_specific=down)


def tier_pairs(n_tiers: int, adjacent_only: bool) -> list[tuple[int, int]]:
    """Tier index pairs (i, j), i < j, checked for a hierarchy of ``n_tiers`` tiers."""
    if adjacent_only:
        return [(i, i + 1) for i in range(n_tiers - 1)]
    return [(i, j) for i in range(n_tiers) for j in range(i + 1, n_tiers)]


def hierarchy_entailment(
    scorer: Scorer, hierarchies: Sequence[Sequence[str]], adjacent_only: bool
) -> list[HierarchyDecision]:
    """Check every hierarchy (tiers general -> specific) in one ``score`` call.

    ``adjacent_only=False`` checks all pairs i < j (seed filter, SPEC step 2); ``True`` checks
    (T1,T2), (T2,T3), (T3,T4) (positive completion, step 5).
    """
    index_pairs = [tier_pairs(len(tiers), adjacent_only) for tiers in hierarchies]
    flat = [(tiers[i], tiers[j]) for tiers, pairs in zip(hierarchies, index_pairs) for i, j in pairs]
    decision = entailed_not_entailing(scorer, flat)
    out: list[HierarchyDecision] = []
    start = 0
    for pairs in index_pairs:
        stop = start + len(pairs)
        out.append(HierarchyDecision(
            ok=bool(decision.ok[start:stop].all()),
            pairs=list(pairs),
            p_forward=[float(p) for p in decision.p_specific_entails_general[start:stop]],
            p_backward=[float(p) for p in decision.p_general_entails_specific[start:stop]],
        ))
        start = stop
    return out


def contradicts(scorer: Scorer, pairs: Sequence[tuple[str, str]]) -> ContradictionDecision:
    """Does ``a`` contradict ``b`` (p_c(a, b) > 0.5, a as premise)? One ``score`` call."""
    import numpy as np

    contradiction = scorer.score(list(pairs)).contradiction if len(pairs) else np.zeros(0)
    p = np.asarray(contradiction, dtype=np.float64)
    return ContradictionDecision(ok=p > THRESHOLD, p_contradiction=p)
