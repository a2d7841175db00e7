"""Taxonomy tables as training hierarchies (finetune.taxonomy_data): chains, sibling hard negatives,
masks for missing ranks and table errors, on hand-made tables and on the real Rare Species tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune.config import load_settings, resolve
from finetune.data import TrainData
from finetune.taxonomy_data import (
    MISSING,
    TaxonomyError,
    TaxonomyTrainData,
    load_settings_data,
    looks_like_taxonomy,
    read_taxonomy,
    sample_hard_negatives,
    taxonomy_train_data,
)

RARE_SPECIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "taxonomy" / "rare_species_metadata.csv"
RANKS7 = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
RANKS5 = ["kingdom", "phylum", "class", "genus", "species"]
COLUMNS5 = [*RANKS5, "common_name", "filepath"]
ROWS5 = [
    ("Animalia", "Chordata", "Aves", "Corvus", "corax", "common raven", "a.png"),
    ("Animalia", "Chordata", "Aves", "Corvus", "corone", "carrion crow", "b.png"),
    ("Animalia", "Chordata", "Aves", "Pica", "pica", "", "c.png"),
    ("Animalia", "Chordata", "Mammalia", "Vulpes", "vulpes", "red fox", "d.png"),
    ("Animalia", "Mollusca", "Bivalvia", "Unio", "pictorum", "painter's mussel", "e.png"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Quercus", "robur", "oak", "f.png"),
    ("Animalia", "", "Aves", "Pica", "", "", "g.png"),  # phylum and species missing
]


def write_table(path: Path, rows=ROWS5, columns=COLUMNS5) -> Path:
    frame = pd.DataFrame(rows, columns=columns)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def test_chains_negatives_and_masks_on_a_hand_made_table(tmp_path):
    table = write_table(tmp_path / "tax.csv")
    data = taxonomy_train_data(table, RANKS5, style="taxonomic", template="a photo of {}.", seed=3)
    assert isinstance(data, TrainData) and data.levels == 5 and data.index.shape == (7, 10) and data.root_text == "Eukarya"
    assert data.positive[0] == [
        "a photo of Animalia.", "a photo of Animalia Chordata.", "a photo of Animalia Chordata Aves.",
        "a photo of Animalia Chordata Aves Corvus.", "a photo of Animalia Chordata Aves Corvus corax.",
    ]
    # Row g lacks its phylum and species: masked, and its class text is filled in from the tree
    # (Aves is under Chordata on other lines).
    assert data.mask[6, :5].tolist() == [True, False, True, True, False]
    assert data.positive[6][1] == data.positive[6][4] == ""
    assert data.positive[6][2] == "a photo of Animalia Chordata Aves."
    # Negatives, by hand. Kingdom: the other kingdom. Corvus corax's species negative is its only
    # sibling Corvus corone; Pica pica has no sibling species; Mammalia's only sibling is Aves.
    assert data.negative[0][0] == "a photo of Plantae." and data.negative[5][0] == "a photo of Animalia."
    assert data.negative[0][4] == "a photo of Animalia Chordata Aves Corvus corone."
    assert data.negative[1][4] == "a photo of Animalia Chordata Aves Corvus corax."
    assert data.negative[3][2] == "a photo of Animalia Chordata Aves."
    assert data.negative[0][3] == "a photo of Animalia Chordata Aves Pica."
    assert not data.mask[2, 5 + 4] and data.negative[2][4] == ""  # Pica pica: no sibling species
    assert not data.mask[5, 5 + 1]  # Tracheophyta: the only phylum of Plantae
    # Counted per rank: rows whose rank exists but has no sibling.
    assert data.no_sibling == {"kingdom": 0, "phylum": 1, "class": 2, "genus": 3, "species": 4}
    common = taxonomy_train_data(table, RANKS5, style="taxonomic+common", template="{}")
    assert common.positive[0][-1] == "Animalia Chordata Aves Corvus corax with common name common raven"
    assert common.positive[2][-1] == "Animalia Chordata Aves Pica pica"  # no common name given
    assert common.negative[1][-1] == "Animalia Chordata Aves Corvus corax with common name common raven"
    name = taxonomy_train_data(table, RANKS5, style="name", template="{}")
    assert name.positive[0] == ["Animalia", "Chordata", "Aves", "Corvus", "Corvus corax"]


def test_parquet_equals_csv_and_auto_format(tmp_path):
    csv_data = taxonomy_train_data(write_table(tmp_path / "t.csv"), RANKS5)
    pq_data = taxonomy_train_data(write_table(tmp_path / "t.parquet"), RANKS5)
    assert pq_data.positive == csv_data.positive and pq_data.negative == csv_data.negative
    assert looks_like_taxonomy(tmp_path / "t.csv", RANKS5) and looks_like_taxonomy(tmp_path / "t.parquet", RANKS5)
    assert not looks_like_taxonomy(tmp_path / "t.csv", RANKS7)  # no order/family columns
    settings = resolve(load_settings(None, [f"data.source={tmp_path / 't.csv'}", "taxonomy.ranks=" + ",".join(RANKS5)]))
    assert isinstance(load_settings_data(settings), TaxonomyTrainData)
    release = tmp_path / "release.csv"
    release.write_text("positive,negative,image_url\na => b => c => d,e => f => g => h,x.jpg\n")
    settings = resolve(load_settings(None, [f"data.source={release}"]))
    assert not isinstance(load_settings_data(settings), TaxonomyTrainData)
    forced = resolve(load_settings(None, [f"data.source={release}", "data.format=taxonomy"]))
    with pytest.raises(TaxonomyError, match="no column for rank 'kingdom'.*taxonomy.ranks"):
        load_settings_data(forced)


def test_bad_tables_get_one_clear_error(tmp_path):
    with pytest.raises(TaxonomyError, match=r"a\.csv: no column for rank 'order' \(tried order; the table has kingdom, "):
        read_taxonomy(write_table(tmp_path / "a.csv"), [*RANKS5[:3], "order", "genus"])
    two_parents = [*ROWS5[:3], ("Animalia", "Chordata", "Mammalia", "Corvus", "major", "", "x.png")]
    with pytest.raises(TaxonomyError, match=r"b\.csv: line 5: genus 'Corvus' is under class 'Mammalia' here but under 'Aves' on line 2"):
        read_taxonomy(write_table(tmp_path / "b.csv", two_parents), RANKS5)
    per_taxon_cols = COLUMNS5[:-1]
    taxa = [r[:-1] for r in ROWS5[:3]] + [ROWS5[0][:-1]]
    with pytest.raises(TaxonomyError, match=r"c\.csv: line 5: duplicate taxon .*Corvus corax.*first on line 2"):
        read_taxonomy(write_table(tmp_path / "c.csv", taxa, per_taxon_cols), RANKS5)
    same_image = [*ROWS5[:2], ROWS5[2][:-1] + ("a.png",)]
    with pytest.raises(TaxonomyError, match=r"d\.csv: line 4: duplicate image 'a\.png', first on line 2"):
        read_taxonomy(write_table(tmp_path / "d.csv", same_image), RANKS5)
    with pytest.raises(TaxonomyError, match=r"e\.csv: line 2: no rank is named"):
        read_taxonomy(write_table(tmp_path / "e.csv", [("", "", "", "", "", "", "z.png")]), RANKS5)
    with pytest.raises(TaxonomyError, match="image column 'path'"):
        taxonomy_train_data(write_table(tmp_path / "f.csv"), RANKS5, image_column="path")
    with pytest.raises(TaxonomyError, match="label style"):
        taxonomy_train_data(write_table(tmp_path / "g.csv"), RANKS5, style="latin")


def test_negatives_are_seeded():
    if not RARE_SPECIES.is_file():
        pytest.skip(f"real taxonomy table not found at {RARE_SPECIES}")
    table = read_taxonomy(RARE_SPECIES, RANKS7)
    a = sample_hard_negatives(table.tree, table.taxa, 0)
    assert np.array_equal(a, sample_hard_negatives(table.tree, table.taxa, 0))
    assert not np.array_equal(a, sample_hard_negatives(table.tree, table.taxa, 1))


def test_hard_negatives_on_the_real_rare_species_tree():
    """Every negative shares exactly the ranks above its level; no negative equals a positive."""
    if not RARE_SPECIES.is_file():
        pytest.skip(f"real taxonomy table not found at {RARE_SPECIES}")
    frame = pd.read_csv(RARE_SPECIES, dtype=str, keep_default_na=False)
    data = taxonomy_train_data(RARE_SPECIES, RANKS7, template="{}", seed=0)
    table, neg = data.table, data.negative_taxa
    tree = table.tree
    assert [len(n) for n in tree.names] == [1, 5, 15, 85, 202, 316, 400]
    assert len(data) == len(frame) == 11983
    # The rows' own names, read straight from the file (Rare Species keeps the class rank in "cls").
    truth = frame[["kingdom", "phylum", "cls", "order", "family", "genus"]].to_numpy()
    truth = np.concatenate([truth, (frame["genus"] + " " + frame["species"]).to_numpy()[:, None]], axis=1)
    checked = 0
    for i in range(0, len(frame), 7):  # every 7th row: all 1,712 of them, every rank
        for j in range(7):
            if neg[i, j] == MISSING:
                continue
            path = [tree.names[r][k] for r, k in enumerate(tree.ancestors(j, int(neg[i, j])))]
            assert path[:j] == list(truth[i, :j])  # shares every rank above level j ...
            assert path[j] != truth[i, j]  # ... and differs at level j
            assert data.negative[i][j] not in data.positive[i]  # no negative text is a positive of its item
            if j:  # the taxonomic text spells the shared ranks out: it extends the positive's parent text
                assert data.negative[i][j].startswith(data.positive[i][j - 1] + " ")
            checked += 1
    assert checked > 5000
    # Masked exactly where the row's taxon is an only child (one kingdom: every kingdom negative).
    parents = pd.Series([""] * len(frame))
    for j, rank in enumerate(RANKS7):
        names = pd.Series(truth[:, j])
        n_siblings = names.groupby(parents).transform("nunique")  # taxa of rank j under the row's parent
        parents = parents + "/" + names
        assert data.no_sibling[rank] == int((n_siblings == 1).sum())
        assert ((neg[:, j] == MISSING) == (n_siblings == 1).to_numpy()).all()
    assert data.no_sibling["kingdom"] == len(frame) and data.no_sibling["phylum"] == 0
    # Positive chains: each rank's taxonomic text extends the one above.
    for i in (0, 5000, 11982):
        for j in range(1, 7):
            assert data.positive[i][j].startswith(data.positive[i][j - 1] + " ")
        assert data.positive[i][-1].endswith(" " + truth[i, -1])
