"""Lexical entailment on HyperLex (HierarCaps paper section 6.1 and supplementary C.6).

HyperLex (Vulić et al., 2017) grades 2,616 word pairs (X, Y) by "to what degree is X a type of
Y?" on a 0-6 scale. The predicted score is the negated exterior angle ``-Ξ_r(e_Y, e_X)``: the angle
at the general word's embedding ``e_Y`` between the ray from the root and the step to the specific
word ``e_X`` is small when X lies further out along Y's direction, i.e. when X is a kind of Y.
Each word is embedded inside the prompt ``a picture of a {word}`` (supplementary: it works better
than the bare word). The metric is Spearman's ρ against the gold scores, over all pairs (ρ_all)
and over the noun pairs (ρ_N).

The data is not redistributed with hierarcaps; download ``hyperlex-data.zip`` from the HyperLex
page (Cambridge LTL; see docs/evaluation.md) and pass ``hyperlex-all.txt``. The reader accepts
any whitespace- or comma-separated table with a header naming ``WORD1``, ``WORD2``, ``AVG_SCORE``
and optionally ``POS`` (``N`` for nouns, ``V`` for verbs); header names are case-insensitive.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from finetune.evaluation.common import Encoder, encode_texts, file_sha256, package_versions, text_root
from finetune.geometry import exterior_angle

DEFAULT_PROMPT = "a picture of a {}"
_REQUIRED = ("WORD1", "WORD2", "AVG_SCORE")


@dataclass(frozen=True)
class LexicalPairs:
    """Graded pairs: ``specific[i]`` is a type of ``general[i]`` to degree ``score[i]``."""

    specific: list[str]
    general: list[str]
    score: np.ndarray  # (N,)
    pos: list[str]  # "N", "V" or "" per pair


def read_hyperlex(path: Path | str) -> LexicalPairs:
    """Read a HyperLex-format table (see the module docstring). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HyperLex file {path} does not exist; see docs/evaluation.md for where to get it")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header with {', '.join(_REQUIRED)}")
    delimiter = "," if "," in lines[0] else None
    split = (lambda s: next(csv.reader([s]))) if delimiter else str.split
    header = [h.strip().upper() for h in split(lines[0])]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path}: line 1: header lacks {missing}; found {header}")
    col = {name: header.index(name) for name in header}
    specific, general, score, pos = [], [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = split(line)
        try:
            value = float(fields[col["AVG_SCORE"]])
            specific.append(fields[col["WORD1"]].strip())
            general.append(fields[col["WORD2"]].strip())
        except (IndexError, ValueError):
            raise ValueError(f"{path}: line {number}: cannot read WORD1, WORD2 and a numeric AVG_SCORE from {line!r}") from None
        score.append(value)
        pos.append(fields[col["POS"]].strip().upper() if "POS" in col and len(fields) > col["POS"] else "")
    return LexicalPairs(specific, general, np.asarray(score, dtype=np.float64), pos)


def entailment_scores(specific: torch.Tensor, general: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Predicted degree of "specific is a type of general": ``-Ξ_r(general, specific)``.

    ``specific``, ``general``: (N, D) normalised embeddings; ``root``: (D,). Returns (N,).
    """
    return -exterior_angle(general, specific, root)


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman's ρ (NaN with fewer than two pairs)."""
    if len(pred) < 2:
        return float("nan")
    return float(spearmanr(pred, gold).statistic)


def lexical_metrics(pairs: LexicalPairs, predicted: np.ndarray) -> dict[str, Any]:
    """ρ_all over all pairs and ρ_N over noun pairs (POS ``N``)."""
    nouns = np.array([p == "N" for p in pairs.pos], dtype=bool)
    return {
        "rho_all": spearman(predicted, pairs.score),
        "rho_nouns": spearman(predicted[nouns], pairs.score[nouns]) if nouns.any() else None,
        "n_pairs": len(pairs.score),
        "n_noun_pairs": int(nouns.sum()),
    }


def evaluate_lexical(
    encoder: Encoder, hyperlex: Path | str, prompt: str = DEFAULT_PROMPT, model: str | None = None, batch_size: int | None = None
) -> dict[str, Any]:
    """HyperLex Spearman ρ of ``encoder``: embeds each distinct word once (in batches)."""
    pairs = read_hyperlex(hyperlex)
    words = sorted(set(pairs.specific) | set(pairs.general))
    with torch.no_grad():
        root = text_root(encoder)
        emb = encode_texts(encoder, [prompt.format(w) for w in words], batch_size)
    index = {w: i for i, w in enumerate(words)}
    spec = emb[[index[w] for w in pairs.specific]]
    gen = emb[[index[w] for w in pairs.general]]
    predicted = entailment_scores(spec, gen, root).double().numpy()
    return {
        "task": "hyperlex",
        **lexical_metrics(pairs, predicted),
        "prompt": prompt,
        "model": model,
        "backend": getattr(encoder, "kind", None),
        "file": str(hyperlex),
        "file_sha256": file_sha256(Path(hyperlex)),
        "versions": package_versions(),
    }

