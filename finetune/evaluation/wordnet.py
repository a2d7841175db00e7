"""WordNet hypernymy ordering check: does the embedding place hypernyms nearer the root?

A radial embedding (HierarCaps paper, sections 3-4) should put a hypernym (``animal``) closer to
the entailment root ``r`` (the embedding of ``""``) than its hyponyms (``dog``), and a hyponym
should lie further out along its hypernym's direction, i.e. at a small exterior angle
``Ξ_r(hypernym, hyponym)``. WordNet's noun hierarchy gives such pairs for free. The check:

1. read the WordNet 3.0 noun database (``data.noun`` + ``index.noun``, format ``wndb(5WN)``)
   with the small reader below: no nltk, no download (Debian's ``wordnet-base`` ships the
   files in ``/usr/share/wordnet``; any Princeton WordNet 3.0 ``dict/`` folder works);
2. sample, with a seed, ``n_chains`` noun synsets whose hypernym path has at least
   ``min_depth`` edges, and take one path each, root ``entity.n.01`` -> ... -> the synset. The
   path follows each synset's first-listed hypernym (``@``; an instance hypernym ``@i`` only
   where there is no ``@``);
3. embed ``a picture of a {lemma}`` (first lemma, underscores as spaces) of every node, all
   distinct texts in one batched ``encode_text`` call;
4. report

   * ``tau_depth``: per chain, Kendall's tau-b between depth (0 at ``entity``) and radius
     ``|e - r|``, averaged over chains (as tau_d of the retrieval benchmark; 1 = radii grow
     strictly with depth);
   * ``hypernym_closer_fraction``: over the distinct (hypernym, hyponym) edges of the sampled
     chains, the fraction where the hypernym's radius is strictly smaller (an edge whose two
     ends have the same text is left out and counted in ``n_same_text_edges``);
   * ``angle_true_mean`` / ``angle_shuffled_mean`` / ``angle_gap``: the mean exterior angle
     ``Ξ_r(hypernym, hyponym)`` over those edges, and over shuffled pairs of the same depths
     (each hypernym paired with a hyponym of another edge at the same depth, WordNet edges left
     out); ``angle_gap = shuffled - true`` is positive when the geometry encodes hypernymy.

The reader keeps, per synset, its offset, lemmas and hypernym indices (about 82k synsets, a
few tens of MB), and reads the files line by line.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.evaluation.common import Encoder, encode_texts, file_sha256, package_versions, text_root
from finetune.evaluation.lexical import DEFAULT_PROMPT
from finetune.evaluation.retrieval import kendall_tau_order
from finetune.geometry import exterior_angle, radius

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
INSTALL_HINT = (
    "install it with `apt-get install --no-install-recommends wordnet-base` (files in /usr/share/wordnet) "
    "or pass --wordnet-dir pointing at a WordNet 3.0 dict/ folder from the Princeton download"
)
_HYPERNYM, _INSTANCE_HYPERNYM = "@", "@i"


@dataclass(frozen=True)
class WordNetNouns:
    """The noun synsets of a WordNet database, indexed 0..S-1 in file order.

    ``offsets[i]``: synset offset; ``lemmas[i]``: its words (file spelling, underscores kept);
    ``names[i]``: nltk-style name ``lemma.n.NN`` (sense number from ``index.noun``);
    ``hypernyms[i]`` / ``instance_hypernyms[i]``: indices of its ``@`` / ``@i`` targets.
    """

    offsets: list[int]
    lemmas: list[tuple[str, ...]]
    names: list[str]
    hypernyms: list[tuple[int, ...]]
    instance_hypernyms: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.offsets)

    def parent(self, i: int) -> int:
        """The hypernym a path follows: the first ``@``, else the first ``@i``, else -1 (a root)."""
        ups = self.hypernyms[i] or self.instance_hypernyms[i]
        return ups[0] if ups else -1

    def is_instance(self, i: int) -> bool:
        """True for an instance (``Paris``), i.e. a synset with only instance hypernyms."""
        return not self.hypernyms[i] and bool(self.instance_hypernyms[i])

    def path(self, i: int) -> list[int]:
        """Hypernym path root -> ... -> ``i`` along :meth:`parent` (synset indices)."""
        chain = [i]
        while (p := self.parent(chain[-1])) >= 0:
            if len(chain) > len(self):
                raise ValueError(f"hypernym cycle through synset {self.names[i]}")
            chain.append(p)
        return chain[::-1]

    def depths(self) -> np.ndarray:
        """Length in edges of every synset's :meth:`path`: (S,) int."""
        depth = np.full(len(self), -1, dtype=np.int64)
        for i in range(len(self)):
            stack = [i]
            while depth[stack[-1]] < 0:
                p = self.parent(stack[-1])
                if p < 0:
                    depth[stack[-1]] = 0
                    break
                if len(stack) > len(self):
                    raise ValueError(f"hypernym cycle through synset {self.names[i]}")
                stack.append(p)
            for j in reversed(stack[:-1]):
                depth[j] = depth[self.parent(j)] + 1
        return depth


def _parse_data_line(line: str, path: Path, number: int) -> tuple[int, tuple[str, ...], list[tuple[str, int]]]:
    """One ``data.noun`` line -> (offset, lemmas, [(pointer symbol, target offset) to nouns])."""
    fields = line.split(" | ", 1)[0].split()
    try:
        offset = int(fields[0])
        w_cnt = int(fields[3], 16)  # two hexadecimal digits
        lemmas = tuple(fields[4 : 4 + 2 * w_cnt : 2])
        p_at = 4 + 2 * w_cnt
        p_cnt = int(fields[p_at])
        ptrs = fields[p_at + 1 : p_at + 1 + 4 * p_cnt]
        if len(lemmas) != w_cnt or len(ptrs) != 4 * p_cnt:
            raise IndexError
        pointers = [(ptrs[k], int(ptrs[k + 1])) for k in range(0, len(ptrs), 4) if ptrs[k + 2] == "n"]
    except (IndexError, ValueError):
        raise ValueError(
            f"{path}: line {number}: not a WordNet data line "
            "(synset_offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptr... | gloss)"
        ) from None
    return offset, lemmas, pointers


def _sense_numbers(index_path: Path) -> dict[int, dict[str, int]]:
    """``index.noun`` -> {synset offset: {lower-case lemma: sense number}}."""
    senses: dict[int, dict[str, int]] = defaultdict(dict)
    with open(index_path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.startswith("  ") or not line.strip():
                continue  # license header
            fields = line.split()
            try:
                synset_cnt = int(fields[2])
                offsets = fields[len(fields) - synset_cnt :]
                for sense, off in enumerate(offsets, start=1):
                    senses[int(off)][fields[0]] = sense
            except (IndexError, ValueError):
                raise ValueError(f"{index_path}: line {number}: not a WordNet index line (lemma pos synset_cnt ...)") from None
    return senses


def wordnet_files(wordnet_dir: Path | str) -> tuple[Path, Path]:
    """``(data.noun, index.noun)`` in ``wordnet_dir``; FileNotFoundError with the fix when absent."""
    folder = Path(wordnet_dir)
    files = (folder / "data.noun", folder / "index.noun")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"WordNet folder {folder} lacks {', '.join(missing)}; {INSTALL_HINT}")
    return files


def read_wordnet_nouns(wordnet_dir: Path | str = DEFAULT_WORDNET_DIR) -> WordNetNouns:
    """Read the noun synsets of a WordNet 3.0 database folder (``data.noun``, ``index.noun``).

    Lines starting with two spaces (the license header) are skipped. Errors name the file and
    line; a hypernym pointer to a synset absent from ``data.noun`` is an error.
    """
    data_path, index_path = wordnet_files(wordnet_dir)
    offsets: list[int] = []
    lemmas: list[tuple[str, ...]] = []
    pointers: list[list[tuple[str, int]]] = []
    with open(data_path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            offset, words, ptrs = _parse_data_line(line, data_path, number)
            offsets.append(offset)
            lemmas.append(words)
            pointers.append(ptrs)
    index = {off: i for i, off in enumerate(offsets)}

    def targets(i: int, symbol: str) -> tuple[int, ...]:
        out = []
        for sym, off in pointers[i]:
            if sym == symbol:
                if off not in index:
                    raise ValueError(f"{data_path}: synset {offsets[i]:08d} points ({sym}) to {off:08d}, absent from the file")
                out.append(index[off])
        return tuple(out)

    senses = _sense_numbers(index_path)
    names = [f"{words[0]}.n.{senses.get(off, {}).get(words[0].lower(), 0):02d}" for off, words in zip(offsets, lemmas)]
    return WordNetNouns(
        offsets=offsets,
        lemmas=lemmas,
        names=names,
        hypernyms=[targets(i, _HYPERNYM) for i in range(len(offsets))],
        instance_hypernyms=[targets(i, _INSTANCE_HYPERNYM) for i in range(len(offsets))],
    )


def sample_chains(
    nouns: WordNetNouns, n_chains: int, min_depth: int = 5, seed: int = 0, include_instances: bool = False
) -> list[list[int]]:
    """``n_chains`` hypernym paths (root first, synset indices), of leaves drawn without
    replacement (seeded) among synsets with at least ``min_depth`` edges to the root. Instances
    (``Paris``) are left out as leaves unless ``include_instances``."""
    depth = nouns.depths()
    eligible = [i for i in range(len(nouns)) if depth[i] >= min_depth and (include_instances or not nouns.is_instance(i))]
    if not eligible:
        raise ValueError(f"no noun synset has a hypernym path of {min_depth} or more edges; lower min_depth")
    rng = np.random.default_rng(seed)
    leaves = rng.choice(np.asarray(eligible), size=min(n_chains, len(eligible)), replace=False)
    return [nouns.path(int(i)) for i in leaves]


def _depth_tau(chain_radii: Sequence[np.ndarray]) -> np.ndarray:
    """Kendall tau-b of depth vs radius per chain (chains of any length): (C,), NaN if undefined."""
    tau = np.full(len(chain_radii), np.nan)
    by_length: dict[int, list[int]] = defaultdict(list)
    for c, r in enumerate(chain_radii):
        by_length[len(r)].append(c)
    for length, members in by_length.items():
        if length >= 2:
            tau[members] = kendall_tau_order(np.stack([chain_radii[c] for c in members]))
    return tau


def _shuffled_pairs(edges: np.ndarray, depth: np.ndarray, true_edges: set[tuple[int, int]], rng: np.random.Generator) -> np.ndarray:
    """Non-edge pairs of the same depths: within each hypernym depth, the edges in a random order,
    each hypernym paired with the next edge's hyponym (cyclically, so never with its own); pairs
    that are WordNet edges or one node twice are dropped. (P, 2)."""
    pairs = []
    for d in np.unique(depth):
        group = edges[depth == d][rng.permutation(int((depth == d).sum()))]
        for a, b in zip(group[:, 0], np.roll(group[:, 1], 1)):
            if a != b and (int(a), int(b)) not in true_edges:
                pairs.append((a, b))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def hypernymy_metrics(
    chains: Sequence[Sequence[int]],
    emb: torch.Tensor,
    root: torch.Tensor,
    true_edges: set[tuple[int, int]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Ordering metrics of hypernym chains (see the module docstring).

    ``chains``: node ids root -> leaf, indexing rows of ``emb`` (N, D) (normalised embeddings);
    ``root``: (D,) the entailment root. ``true_edges``: every (hypernym id, hyponym id) that is an
    edge of the full hierarchy (default: the chains' own edges); shuffled pairs avoid them.
    """
    radii = radius(emb.float(), root.float()).double().numpy()  # (N,)
    tau = _depth_tau([radii[list(c)] for c in chains])
    edge_depth: dict[tuple[int, int], int] = {}
    by_depth: dict[int, list[float]] = defaultdict(list)
    for chain in chains:
        for d, node in enumerate(chain):
            by_depth[d].append(float(radii[node]))
        for d in range(len(chain) - 1):
            edge_depth[(int(chain[d]), int(chain[d + 1]))] = d
    # A hypernym and hyponym with one text (one embedding) say nothing about the geometry.
    same = [e for e in edge_depth if e[0] == e[1]]
    for e in same:
        del edge_depth[e]
    if not edge_depth:
        raise ValueError("no hypernym edges between distinct nodes in the chains")
    edges = np.asarray(list(edge_depth), dtype=np.int64)  # (E, 2) distinct edges
    depth = np.asarray(list(edge_depth.values()))
    known = set(edge_depth) if true_edges is None else set(true_edges) | set(edge_depth)
    shuffled = _shuffled_pairs(edges, depth, known, np.random.default_rng(seed))

    def angles(pairs: np.ndarray) -> np.ndarray:
        return exterior_angle(emb[pairs[:, 0]].float(), emb[pairs[:, 1]].float(), root.float()).double().numpy()

    true_angle = angles(edges)
    shuffled_angle = angles(shuffled) if len(shuffled) else np.array([])
    return {
        "tau_depth": float(np.nanmean(tau)) if np.isfinite(tau).any() else None,
        "tau_depth_undefined_chains": int(np.isnan(tau).sum()),
        "n_chains": len(chains),
        "hypernym_closer_fraction": float(np.mean(radii[edges[:, 0]] < radii[edges[:, 1]])),
        "n_edges": len(edges),
        "n_same_text_edges": len(same),
        "angle_true_mean": float(true_angle.mean()),
        "angle_shuffled_mean": float(shuffled_angle.mean()) if len(shuffled) else None,
        "angle_gap": float(shuffled_angle.mean() - true_angle.mean()) if len(shuffled) else None,
        "n_shuffled_pairs": len(shuffled),
        "mean_radius_by_depth": [float(np.mean(by_depth[d])) for d in sorted(by_depth)],
    }


def evaluate_wordnet(
    encoder: Encoder,
    wordnet_dir: Path | str = DEFAULT_WORDNET_DIR,
    n_chains: int = 500,
    min_depth: int = 5,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    model: str | None = None,
    batch_size: int | None = None,
    include_instances: bool = False,
) -> dict[str, Any]:
    """WordNet hypernymy ordering metrics of ``encoder`` (module docstring); one batched text pass."""
    nouns = read_wordnet_nouns(wordnet_dir)
    chains = sample_chains(nouns, n_chains, min_depth, seed, include_instances)
    synsets = sorted({s for c in chains for s in c})
    texts = sorted({prompt.format(nouns.lemmas[s][0].replace("_", " ")) for s in synsets})
    row = {t: i for i, t in enumerate(texts)}
    node = {s: row[prompt.format(nouns.lemmas[s][0].replace("_", " "))] for s in synsets}
    with torch.no_grad():
        root = text_root(encoder)
        emb = encode_texts(encoder, texts, batch_size)
    # Synsets sharing a lemma share a text row; an edge in WordNet between any two such texts counts as true.
    true_edges = {(node[p], node[s]) for s in synsets for p in nouns.hypernyms[s] + nouns.instance_hypernyms[s] if p in node}
    metrics = hypernymy_metrics([[node[s] for s in c] for c in chains], emb, root, true_edges, seed)
    data_path, _ = wordnet_files(wordnet_dir)
    return {
        "task": "wordnet_hypernymy",
        **metrics,
        "n_texts": len(texts),
        "min_depth": min_depth,
        "seed": seed,
        "include_instances": include_instances,
        "prompt": prompt,
        "example_chains": [[nouns.names[s] for s in c] for c in chains[:5]],
        "model": model,
        "backend": getattr(encoder, "kind", None),
        "wordnet_dir": str(wordnet_dir),
        "file_sha256": file_sha256(data_path),
        "n_synsets": len(nouns),
        "versions": package_versions(),
    }
