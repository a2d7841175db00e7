"""RCME and the level loss on a taxonomy table end to end (tiny open_clip model, both towers), then
``hierarcaps-eval taxonomy`` and the ``finetune`` flow's before/after taxonomy evaluation.

The images are small synthetic PNGs generated here (one colour per species plus noise): no real
organism images exist on this machine, and the tests check that training and evaluation run on
the table's chains and images, not what a real model learns from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetune.backends import load_backend
from finetune.config import load_settings
from finetune.evaluation.cli import main as eval_main
from finetune.train import read_log, train

RANKS = ["kingdom", "phylum", "class", "genus", "species"]  # five levels: longer than HierarCaps' four
SPECIES = [
    ("Animalia", "Chordata", "Aves", "Corvus", "corax", "common raven"),
    ("Animalia", "Chordata", "Aves", "Corvus", "corone", "carrion crow"),
    ("Animalia", "Chordata", "Aves", "Pica", "pica", "magpie"),
    ("Animalia", "Chordata", "Mammalia", "Vulpes", "vulpes", "red fox"),
    ("Animalia", "Mollusca", "Bivalvia", "Unio", "pictorum", "painter's mussel"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Quercus", "robur", "oak"),
]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


@pytest.fixture(scope="module")
def taxonomy_dir(tmp_path_factory) -> Path:
    """train.csv (12 images, one identified to genus only), test.csv (6 complete rows), images/<species>/*.png."""
    root = tmp_path_factory.mktemp("taxonomy")
    rng = np.random.default_rng(0)
    rows = []
    for s, (taxon, colour) in enumerate(zip(SPECIES, COLOURS)):
        (root / "images" / f"sp{s}").mkdir(parents=True)
        for n in range(3):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / "images" / f"sp{s}" / f"{n}.png")
            rows.append((*taxon, f"sp{s}/{n}.png"))
    columns = [*RANKS, "common_name", "filepath"]
    train_rows = [r for r in rows if not r[-1].endswith("2.png")]
    train_rows[3] = (*train_rows[3][:4], "", "", train_rows[3][-1])  # a crow identified to the genus only
    pd.DataFrame(train_rows, columns=columns).to_csv(root / "train.csv", index=False)
    pd.DataFrame([r for r in rows if r[-1].endswith("2.png")], columns=columns).to_csv(root / "test.csv", index=False)
    return root


def taxonomy_settings(model_dir: Path, root: Path, out: Path, *extra: str):
    return load_settings(None, [
        "model.backend=open-clip", f"model.name_or_path={model_dir}", f"data.source={root / 'train.csv'}",
        f"data.images_dir={root / 'images'}", "taxonomy.ranks=" + ",".join(RANKS), f"run.output_dir={out}",
        "optim.lr=1e-3", "optim.batch_size=6", "optim.max_steps=2", "optim.scheduler=constant", *extra,
    ])


@pytest.mark.parametrize("loss", ["rcme", "level"])
def test_rcme_and_level_loss_train_both_towers_on_a_taxonomy_table(loss, tiny_open_clip_dir, taxonomy_dir, tmp_path):
    result = train(taxonomy_settings(tiny_open_clip_dir, taxonomy_dir, tmp_path / loss, f"loss.name={loss}"))
    log = read_log(result.log_path)
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss/total"]) for r in log)
    if loss == "rcme":
        assert log[0]["loss/cma"] > 0 and log[0]["loss/local"] != 0 and "loss/global" in log[0]
    else:  # one level per rank
        assert {f"loss/level{i}" for i in range(1, 6)} <= set(log[0])
    run = json.loads(result.run_json.read_text())
    assert run["counts"]["levels"] == 5 and run["counts"]["items"] == 12
    assert run["counts"]["negatives_without_sibling"]["species"] == 8  # pica, vulpes, pictorum, robur: 2 images each
    assert run["settings"]["taxonomy"]["root_text"] == "Eukarya"
    before = load_backend("open-clip", tiny_open_clip_dir).model.state_dict()
    after = load_backend("open-clip", result.final_dir).model.state_dict()
    assert not torch.equal(before["visual.proj"], after["visual.proj"])  # both towers train
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert torch.equal(before["logit_scale"], after["logit_scale"])


def test_hierarcaps_eval_taxonomy_reads_the_same_table(tiny_open_clip_dir, taxonomy_dir, tmp_path):
    out = tmp_path / "taxonomy.json"
    code = eval_main([
        "taxonomy", "--backend", "open-clip", "--model", str(tiny_open_clip_dir), "--table", str(taxonomy_dir / "test.csv"),
        "--images", str(taxonomy_dir / "images"), "--ranks", ",".join(RANKS), "--template", "a photo of {}.",
        "--root-text", "Eukarya", "--style", "taxonomic+common", "--output", str(out),
    ])
    assert code == 0
    m = json.loads(out.read_text())
    for key in ("zero_shot_top1", "top_down_accuracy", "image_to_image_r1"):
        assert list(m[key]) == RANKS and all(0 <= v <= 1 for v in m[key].values())
    assert sum(m["first_misclassification"].values()) == m["n_images"] == 6
    assert 0 <= m["nlca_top_down"] <= 1 and -1 <= m["ordering_tau"] <= 1
    assert m["n_taxa"] == {"kingdom": 2, "phylum": 3, "class": 4, "genus": 5, "species": 6}
    # The suite (what the flow runs) passes the same layout and text settings through.
    code = eval_main([
        "suite", "--backend", "open-clip", "--model", str(tiny_open_clip_dir), "--taxonomy-table", str(taxonomy_dir / "test.csv"),
        "--taxonomy-images", str(taxonomy_dir / "images"), "--taxonomy-ranks", ",".join(RANKS),
        "--taxonomy-root-text", "Eukarya", "--output-dir", str(tmp_path / "suite"),
    ])
    suite = json.loads((tmp_path / "suite" / "metrics.json").read_text())["taxonomy"]
    assert code == 0 and suite["ranks"] == RANKS and suite["root_text"] == "Eukarya"
    assert suite["image_to_image_r1"] == m["image_to_image_r1"]  # images, not texts: same as above
    # The training table has a row without a species: evaluation names it and refuses.
    code = eval_main([
        "taxonomy", "--backend", "open-clip", "--model", str(tiny_open_clip_dir), "--table", str(taxonomy_dir / "train.csv"),
        "--images", str(taxonomy_dir / "images"), "--ranks", ",".join(RANKS), "--output", str(tmp_path / "x.json"),
    ])
    assert code == 2 and not (tmp_path / "x.json").exists()


def test_finetune_flow_evaluates_the_taxonomy_before_and_after(tiny_open_clip_dir, taxonomy_dir, tmp_path):
    from flows.finetune import finetune_flow

    settings = taxonomy_settings(
        tiny_open_clip_dir, taxonomy_dir, tmp_path / "run", "loss.name=rcme", "optim.max_steps=1",
        f"eval.taxonomy_table={taxonomy_dir / 'test.csv'}", f"eval.taxonomy_images={taxonomy_dir / 'images'}",
    )
    result = finetune_flow(None, settings)
    assert result["train"]["steps"] == 1
    for when in ("before", "after"):
        tax = result[when]["taxonomy"]
        assert tax["root_text"] == "Eukarya" and tax["template"] == "a photo of {}." and tax["ranks"] == RANKS
        assert list(tax["image_to_image_r1"]) == RANKS
    assert result["after"]["model"] == result["train"]["final_dir"]
    table = (tmp_path / "run" / "eval" / "comparison.md").read_text()
    assert "| taxonomy.image_to_image_r1.species |" in table and "| taxonomy.nlca_top_down |" in table


# Flows run here report to one session-wide Prefect API (conftest.prefect_server).
pytestmark = pytest.mark.usefixtures("prefect_server")
