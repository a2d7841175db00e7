"""WordNet hypernymy check: the wndb reader on a hand-written excerpt, the metrics on hand-placed
embeddings, and one run on the real database (Debian ``wordnet-base``) with the tiny CLIP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.evaluation.cli import main
from finetune.evaluation.wordnet import hypernymy_metrics, read_wordnet_nouns, sample_chains

REAL_WORDNET = Path("/usr/share/wordnet")

LICENSE = """  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  By obtaining, using  
  3   
  4 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  
"""
# entity > physical_entity > object > {animal (10 lemmas: w_cnt "0a") > {dog, cat}, city > Paris (@i)};
# entity > abstraction. Verb (+ ... v) and hyponym (~) pointers must be ignored.
DATA = LICENSE + """\
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived  
00001930 03 n 01 physical_entity 0 002 @ 00001740 n 0000 ~ 00002684 n 0000 | an entity that has physical existence  
00002137 03 n 02 abstraction 0 abstract_entity 0 002 @ 00001740 n 0000 + 00692347 v 0101 | a general concept  
00002684 03 n 02 object 0 physical_object 0 004 @ 00001930 n 0000 + 00532607 v 0105 ~ 00015388 n 0000 ~ 08524735 n 0000 | a tangible and visible entity  
00015388 03 n 0a animal 0 animate_being 0 beast 0 brute 0 creature 0 fauna 0 critter 0 wight 1 being 2 beastie 0 003 @ 00002684 n 0000 ~ 02084071 n 0000 ~ 02121620 n 0000 | a living organism  
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 00015388 n 0000 #m 02083863 n 0000 | a member of the genus Canis  
02121620 05 n 01 cat 0 001 @ 00015388 n 0000 | feline mammal  
08524735 15 n 01 city 0 002 @ 00002684 n 0000 ~i 08932568 n 0000 | a large and densely populated urban area  
08932568 15 n 02 Paris 0 City_of_Light 0 001 @i 08524735 n 0000 | the capital and largest city of France  
"""
# "object" lists another synset first, so ours is object.n.02; "Paris" is looked up lower-cased.
INDEX = LICENSE + """\
entity n 1 1 ~ 1 1 00001740  
physical_entity n 1 2 @ ~ 1 0 00001930  
abstraction n 1 2 @ ~ 1 1 00002137  
object n 2 2 @ ~ 2 1 05981230 00002684  
animal n 1 2 @ ~ 1 1 00015388  
dog n 1 2 @ ~ 1 1 02084071  
cat n 1 1 @ 1 1 02121620  
city n 1 2 @ ~ 1 1 08524735  
paris n 1 1 @i 1 0 08932568  
"""


def _write_db(folder: Path, data: str = DATA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(data, encoding="utf-8")
    (folder / "index.noun").write_text(INDEX, encoding="utf-8")
    return folder


def test_reader_parses_the_wndb_format(tmp_path):
    nouns = read_wordnet_nouns(_write_db(tmp_path / "dict"))
    assert len(nouns) == 9  # license lines skipped
    by_name = {n: i for i, n in enumerate(nouns.names)}
    assert set(by_name) == {"entity.n.01", "physical_entity.n.01", "abstraction.n.01", "object.n.02",
                            "animal.n.01", "dog.n.01", "cat.n.01", "city.n.01", "Paris.n.01"}
    animal = by_name["animal.n.01"]
    assert len(nouns.lemmas[animal]) == 10 and nouns.lemmas[animal][-1] == "beastie"  # hex "0a"
    assert nouns.lemmas[by_name["dog.n.01"]] == ("dog", "domestic_dog", "Canis_familiaris")
    assert nouns.offsets[by_name["dog.n.01"]] == 2084071
    assert nouns.hypernyms[by_name["dog.n.01"]] == (animal,)
    assert nouns.hypernyms[by_name["abstraction.n.01"]] == (by_name["entity.n.01"],)  # verb pointer ignored
    paris = by_name["Paris.n.01"]
    assert nouns.hypernyms[paris] == () and nouns.instance_hypernyms[paris] == (by_name["city.n.01"],)
    assert nouns.is_instance(paris) and not nouns.is_instance(animal)
    assert [nouns.names[i] for i in nouns.path(by_name["dog.n.01"])] == [
        "entity.n.01", "physical_entity.n.01", "object.n.02", "animal.n.01", "dog.n.01"]
    assert [nouns.names[i] for i in nouns.path(paris)][-2:] == ["city.n.01", "Paris.n.01"]
    depth = dict(zip(nouns.names, nouns.depths().tolist()))
    assert depth == {"entity.n.01": 0, "physical_entity.n.01": 1, "abstraction.n.01": 1, "object.n.02": 2,
                     "animal.n.01": 3, "dog.n.01": 4, "cat.n.01": 4, "city.n.01": 3, "Paris.n.01": 4}


def test_sampling_is_seeded_deep_enough_and_skips_instances_by_default(tmp_path):
    nouns = read_wordnet_nouns(_write_db(tmp_path / "dict"))
    leaves = {nouns.names[c[-1]] for c in sample_chains(nouns, 10, min_depth=4, seed=0)}
    assert leaves == {"dog.n.01", "cat.n.01"}
    with_instances = sample_chains(nouns, 10, min_depth=4, seed=0, include_instances=True)
    assert {nouns.names[c[-1]] for c in with_instances} == {"dog.n.01", "cat.n.01", "Paris.n.01"}
    assert all(nouns.names[c[0]] == "entity.n.01" and len(c) == 5 for c in with_instances)
    one = [sample_chains(nouns, 1, min_depth=3, seed=s) for s in range(6)]
    assert one[0] == sample_chains(nouns, 1, min_depth=3, seed=0)
    assert len({nouns.names[c[0][-1]] for c in one}) > 1  # the seed decides the draw
    with pytest.raises(ValueError, match="min_depth"):
        sample_chains(nouns, 1, min_depth=9)


def test_bad_line_and_dangling_pointer_name_the_file_and_line(tmp_path):
    bad = DATA.replace("02121620 05 n 01 cat 0 001", "02121620 05 n 01 cat 0 00x")
    with pytest.raises(ValueError, match=r"data\.noun: line 11: not a WordNet data line"):
        read_wordnet_nouns(_write_db(tmp_path / "a", bad))
    dangling = DATA.replace("001 @ 00015388 n 0000 | feline", "001 @ 00099999 n 0000 | feline")
    with pytest.raises(ValueError, match="02121620 points .@. to 00099999"):
        read_wordnet_nouns(_write_db(tmp_path / "b", dangling))


def test_missing_database_names_folder_and_install_command(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install --no-install-recommends wordnet-base"):
        read_wordnet_nouns(tmp_path)
    # The CLI checks the folder before loading any model, and exits 2 with one line.
    code = main(["wordnet", "--backend", "hf-clip", "--model", "no/such-model", "--wordnet-dir", str(tmp_path),
                 "--output", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and "data.noun" in err and "wordnet-base" in err
    assert not (tmp_path / "m.json").exists()


def _on_circle(angle: float, plane: int) -> torch.Tensor:
    """Unit vector at ``angle`` from the root (x axis) in the x-y (plane 1) or x-z (plane 2) plane."""
    v = torch.zeros(3, dtype=torch.float64)
    v[0], v[plane] = math.cos(angle), math.sin(angle)
    return v


def _ext_angle(e: np.ndarray, child: np.ndarray, root: np.ndarray) -> float:
    """Independent exterior angle: arccos of the cosine between e - r and child - e."""
    a, b = e - root, child - e
    return float(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


def test_metrics_on_hand_placed_embeddings():
    """Test double for an encoder: embeddings placed by hand on two great circles through the root,
    so radius 2 sin(angle / 2) grows with the angle and every number is known in closed form."""
    # chain A (x-y plane) goes outwards 0.2, 0.4, 0.6; chain B (x-z plane) 0.2, 0.6, 0.4 (last edge inwards).
    angles = [(0.2, 1), (0.4, 1), (0.6, 1), (0.2, 2), (0.6, 2), (0.4, 2)]
    emb = torch.stack([_on_circle(a, p) for a, p in angles])
    root = _on_circle(0.0, 1)
    chains = [[0, 1, 2], [3, 4, 5]]
    m = hypernymy_metrics(chains, emb, root, seed=0)
    assert m["tau_depth"] == pytest.approx((1 + 1 / 3) / 2)  # B: pairs +, +, -
    assert m["hypernym_closer_fraction"] == pytest.approx(3 / 4)
    assert m["n_edges"] == 4 and m["n_chains"] == 2 and m["n_same_text_edges"] == 0
    # On a great circle through the root, Ξ(a -> b) = b / 2 outwards and pi - (a - b) inwards.
    assert m["angle_true_mean"] == pytest.approx((0.2 + 0.3 + 0.3 + (math.pi - 0.2)) / 4, abs=1e-6)
    # Shuffled: each depth's two hypernyms swap hyponyms across the planes.
    e, r = emb.numpy(), root.numpy()
    shuffled = [(0, 4), (3, 1), (1, 5), (4, 2)]
    assert m["n_shuffled_pairs"] == 4
    expected = np.mean([_ext_angle(e[a], e[b], r) for a, b in shuffled])
    assert m["angle_shuffled_mean"] == pytest.approx(expected, abs=1e-6)
    assert m["angle_gap"] == pytest.approx(expected - m["angle_true_mean"], abs=1e-6)
    radii = [2 * math.sin(a / 2) for a in (0.2, 0.4, 0.6)]
    assert m["mean_radius_by_depth"] == pytest.approx([radii[0], (radii[1] + radii[2]) / 2, (radii[2] + radii[1]) / 2])
    # A declared WordNet edge is never used as a shuffled (non-edge) pair.
    fewer = hypernymy_metrics(chains, emb, root, true_edges={(0, 4)}, seed=0)
    assert fewer["n_shuffled_pairs"] == 3
    assert fewer["angle_true_mean"] == pytest.approx(m["angle_true_mean"])


def test_reversed_radii_give_negative_ordering_and_same_text_edges_are_left_out():
    """Test double again: a chain placed inwards (hyponyms nearer the root) scores tau -1 and fraction 0;
    an edge whose two ends share one embedding row (two synsets, one lemma) is counted, not scored."""
    emb = torch.stack([_on_circle(a, 1) for a in (0.9, 0.6, 0.3)])
    root = _on_circle(0.0, 1)
    m = hypernymy_metrics([[0, 1, 2], [0, 0, 1]], emb, root)
    # [0, 0, 1]: radii r0, r0, r1 < r0: one tie, two discordant pairs -> tau-b = -2 / sqrt(2 * 3)
    assert m["tau_depth"] == pytest.approx((-1 - 2 / math.sqrt(6)) / 2)
    assert m["hypernym_closer_fraction"] == 0.0
    assert m["n_edges"] == 2 and m["n_same_text_edges"] == 1


@pytest.fixture(scope="module")
def real_wordnet() -> Path:
    if not (REAL_WORDNET / "data.noun").is_file():
        pytest.skip("WordNet 3.0 is not installed in /usr/share/wordnet; "
                    "run `apt-get install --no-install-recommends wordnet-base` to enable this test")
    return REAL_WORDNET


def test_real_wordnet_with_tiny_clip(real_wordnet, tiny_hf_clip_dir, tmp_path):
    nouns = read_wordnet_nouns(real_wordnet)
    assert len(nouns) == 82115  # WordNet 3.0 noun synsets
    dog = nouns.offsets.index(2084071)
    assert [nouns.names[i] for i in nouns.path(dog)] == [
        "entity.n.01", "physical_entity.n.01", "object.n.01", "whole.n.02", "living_thing.n.01", "organism.n.01",
        "animal.n.01", "chordate.n.01", "vertebrate.n.01", "mammal.n.01", "placental.n.01", "carnivore.n.01",
        "canine.n.02", "dog.n.01"]
    out = tmp_path / "wordnet.json"
    code = main(["wordnet", "--backend", "hf-clip", "--model", str(tiny_hf_clip_dir), "--wordnet-dir", str(real_wordnet),
                 "--n-chains", "12", "--seed", "3", "--output", str(out)])
    assert code == 0
    m = json.loads(out.read_text(encoding="utf-8"))
    assert m["task"] == "wordnet_hypernymy" and m["n_chains"] == 12 and m["seed"] == 3
    assert m["example_chains"] == [[nouns.names[i] for i in c] for c in sample_chains(nouns, 12, 5, seed=3)][:5]
    assert all(c[0] == "entity.n.01" and len(c) >= 6 for c in m["example_chains"])
    assert -1 <= m["tau_depth"] <= 1 and 0 <= m["hypernym_closer_fraction"] <= 1
    assert 0 <= m["angle_true_mean"] <= math.pi and 0 <= m["angle_shuffled_mean"] <= math.pi
    assert m["n_edges"] >= 12 and m["n_shuffled_pairs"] > 0 and len(m["file_sha256"]) == 64


def test_suite_runs_the_wordnet_check_when_given_a_folder(real_wordnet, tiny_hf_clip_dir, tmp_path):
    from finetune.backends import load_backend
    from finetune.evaluation.suite import SuiteSettings, evaluate_checkpoint

    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    result = evaluate_checkpoint(backend, tmp_path, SuiteSettings(wordnet_dir=str(real_wordnet), wordnet_chains=8))
    assert set(result) >= {"wordnet"} and "hierarcaps" not in result
    assert result["wordnet"]["n_chains"] == 8 and -1 <= result["wordnet"]["tau_depth"] <= 1
    assert json.loads((tmp_path / "metrics.json").read_text())["wordnet"] == result["wordnet"]
