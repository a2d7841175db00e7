"""Taxonomy metrics on a hand-made taxonomy with a test-double encoder, and parsing of the real
Rare Species table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetune.evaluation.taxonomy import (
    RANKS,
    evaluate_taxonomy,
    image_to_image_r1,
    read_taxonomy_table,
    top_down_predictions,
)

TAXONOMY = Path(__file__).resolve().parents[2] / "shared" / "data" / "taxonomy" / "rare_species_metadata.csv"

ROWS = [  # kingdom .. species epithet, image file
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax", "a.png"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "pica", "b.png"),
    ("Animalia", "Mollusca", "Bivalvia", "Unionida", "Unionidae", "Cyclonaias", "tuberculata", "c.png"),
]
# Taxa in order of first appearance, rank by rank: this is their basis direction.
TAXA = ["Animalia", "Chordata", "Mollusca", "Aves", "Bivalvia", "Passeriformes", "Unionida", "Corvidae",
        "Unionidae", "Corvus", "Pica", "Cyclonaias", "corax", "pica", "tuberculata"]
RANK_OF = {t: r for r, names in enumerate([[0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10, 11], [12, 13, 14]]) for i in names for t in [TAXA[i]]}
COLOUR = {"a.png": (10, 0, 0), "b.png": (20, 0, 0), "c.png": (30, 0, 0)}


def _weights(mapping: dict[str, float], rest: float = 0.0) -> torch.Tensor:
    return torch.tensor([mapping.get(t, rest) for t in TAXA])


# Image a (Corvus corax): Mollusca beats Chordata and Pica beats Corvus / pica beats corax.
IMAGE_WEIGHTS = {
    (10, 0, 0): _weights({"Animalia": 1, "Chordata": .2, "Mollusca": .9, "Aves": .5, "Bivalvia": .4, "Passeriformes": .5,
                          "Unionida": .1, "Corvidae": .5, "Unionidae": .1, "Corvus": .3, "Pica": .6, "Cyclonaias": .1,
                          "corax": .3, "pica": .7, "tuberculata": .1}),
    (20, 0, 0): _weights({t: 1.0 for t in ROWS[1][:7]}, 0.1),
    (30, 0, 0): _weights({t: 1.0 for t in ROWS[2][:7]}, 0.1),
}
# Root weight per taxon: higher = nearer the root. Decreasing down the ranks, except that Corvus
# (genus) is given less weight than corax (species): one discordant pair for Corvus corax.
ROOT_WEIGHT = {t: 7.0 - RANK_OF[t] for t in TAXA} | {"Corvus": 1.0, "corax": 2.0}


class BasisEncoder:
    """Test double for a CLIP backend: every taxon label is its own basis vector, images are the
    weight vectors above (looked up by colour), and "" is the root. Similarities and radii are
    therefore set by hand, which a random tiny model cannot do."""

    name = "basis"

    def encode_text(self, texts, batch_size=256):
        out = []
        for t in texts:
            if t == "":
                out.append(_weights(ROOT_WEIGHT))
            else:
                out.append(torch.eye(len(TAXA))[TAXA.index(t.split(" ")[-1])])
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def encode_images(self, images, batch_size=64):
        vecs = [IMAGE_WEIGHTS[tuple(int(v) for v in np.asarray(im)[0, 0])] for im in images]
        return torch.nn.functional.normalize(torch.stack(vecs), dim=-1)


def _write(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    images.mkdir()
    for name, rgb in COLOUR.items():
        Image.new("RGB", (2, 2), rgb).save(images / name)
    table = tmp_path / "taxonomy.csv"
    df = pd.DataFrame(ROWS, columns=["kingdom", "phylum", "cls", "order", "family", "genus", "species", "filepath"])
    df.to_csv(table)
    return table, images


def test_taxonomy_metrics_hand_case(tmp_path):
    table, images = _write(tmp_path)
    m = evaluate_taxonomy(BasisEncoder(), table, images)
    third = 2 / 3
    assert m["zero_shot_top1"] == pytest.approx(
        {"kingdom": 1, "phylum": third, "class": 1, "order": 1, "family": 1, "genus": third, "species": third}
    )
    # top-down: image a goes wrong at the phylum and stays wrong below it
    assert m["top_down_accuracy"] == pytest.approx({"kingdom": 1, **{r: third for r in RANKS[1:]}})
    assert m["first_misclassification"] == {"kingdom": 0, "phylum": 1, "class": 0, "order": 0, "family": 0,
                                            "genus": 0, "species": 0, "none": 2}
    # nLCA: top-down leaf of a shares only the kingdom (6/7); flat species "pica" shares 5 ranks (2/7)
    assert m["nlca_top_down"] == pytest.approx((6 / 7) / 3)
    assert m["nlca_flat"] == pytest.approx((2 / 7) / 3)
    # ordering: Corvus corax has one discordant pair of 21; the other two species are in order
    assert m["ordering_tau"] == pytest.approx((19 / 21 + 1 + 1) / 3)
    assert m["n_taxa"]["genus"] == 3 and m["n_images"] == 3
    for v in m["hierarchical_retrieval"].values():
        assert 0 <= v <= 1


def test_top_down_only_children_compete():
    parent = [np.array([0, 0]), np.array([0, 0, 1])]
    sims = [torch.tensor([[0.9, 0.1]]), torch.tensor([[0.1, 0.2, 0.99]])]
    # child 2 is the best overall but belongs to the unpredicted parent 1
    assert top_down_predictions(sims, parent).tolist() == [[0, 1]]


def test_image_to_image_r1_hand_case():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]]), dim=-1)
    taxa = np.array([[0, 0], [0, 1], [1, 2], [1, 3]])
    # nearest other image: 0 -> 1, 1 -> 0, 2 -> 3, 3 -> 1 (never itself)
    assert image_to_image_r1(emb, taxa, ("class", "species")) == {"class": 0.75, "species": 0.0}
    with pytest.raises(ValueError, match="at least two images"):
        image_to_image_r1(emb[:1], taxa[:1], ("class", "species"))


def test_labels_styles(tmp_path):
    table, _ = _write(tmp_path)
    assert read_taxonomy_table(table).label_texts[-1][0] == "Animalia Chordata Aves Passeriformes Corvidae Corvus corax"
    name = read_taxonomy_table(table, style="name").label_texts
    assert name[-1][0] == "Corvus corax" and name[2] == ["Aves", "Bivalvia"]
    with pytest.raises(ValueError, match="label style"):
        read_taxonomy_table(table, style="latin")


def test_table_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame([("Animalia", "", "c", "o", "f", "g", "s", "x.png")],
                 columns=["kingdom", "phylum", "cls", "order", "family", "genus", "species", "filepath"]).to_csv(bad)
    with pytest.raises(ValueError, match=r"bad\.csv: line 2: empty 'phylum'"):
        read_taxonomy_table(bad)
    (tmp_path / "norank.csv").write_text("kingdom,filepath\nA,x\n")
    with pytest.raises(ValueError, match="no column for rank 'phylum'"):
        read_taxonomy_table(tmp_path / "norank.csv")


def test_real_rare_species_table_parses():
    if not TAXONOMY.is_file():
        pytest.skip(f"real taxonomy table not found at {TAXONOMY}")
    tab = read_taxonomy_table(TAXONOMY)
    df = pd.read_csv(TAXONOMY)
    cols = ["kingdom", "phylum", "cls", "order", "family", "genus", "species"]
    expected = [len(df[cols[: j + 1]].drop_duplicates()) for j in range(len(cols))]
    assert [len(p) for p in tab.taxonomy.paths] == expected
    assert len(tab.taxonomy.paths[-1]) == df["class"].nunique() == 400
    assert tab.row_taxa.shape == (len(df), 7) and len(tab.image_files) == len(df)
    # the scientific name column agrees with the binomial labels
    names = read_taxonomy_table(TAXONOMY, style="name").label_texts[-1]
    assert [names[k] for k in tab.row_taxa[:, -1]] == df["class"].tolist()
