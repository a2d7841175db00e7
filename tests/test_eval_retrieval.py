"""HierarCaps hierarchical retrieval: metric functions on hand-made cases, the vectorised search
against a plain per-image loop, and the released-semantics path on the real test set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from finetune.evaluation.retrieval import (
    Candidates,
    RetrievalSet,
    global_thresholds,
    index_test_set,
    kendall_tau_order,
    kept_predictions,
    load_test_set,
    per_image_thresholds,
    precision_recall,
    predicted_chains,
    read_test_csv,
    released_tau_d,
    retrieve,
    summarize,
    threshold_predictions,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hierarcaps"


# --- Kendall tau_d ---------------------------------------------------------------------------


def test_kendall_tau_hand_cases():
    radii = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4], [0.1, 0.1, 0.2, 0.3]])
    tau = kendall_tau_order(radii)
    # 6 pairs: all concordant; all discordant; one swap (5 - 1) / 6; one tie: 5 / sqrt(5 * 6).
    np.testing.assert_allclose(tau, [1.0, -1.0, 4 / 6, 5 / math.sqrt(30)])


def test_kendall_tau_matches_scipy_tau_b():
    rng = np.random.default_rng(0)
    radii = rng.integers(0, 3, size=(200, 4)).astype(float)  # many ties on purpose
    radii = radii[~(radii == radii[:, :1]).all(1)]
    expected = [kendalltau(r, [1, 2, 3, 4]).statistic for r in radii]
    np.testing.assert_allclose(kendall_tau_order(radii), expected, atol=1e-12)


def test_kendall_tau_all_tied_is_nan_and_summary_ignores_it():
    tau = kendall_tau_order(np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]]))
    assert np.isnan(tau[0]) and tau[1] == 1.0
    s = summarize(np.array([0.5]), np.array([0.25]), tau)
    assert s["tau_d"] == 1.0 and s["tau_d_undefined_rows"] == 1


def test_released_tau_d_ties_keep_tier_order():
    """The released evaluator's kendalltau(argsort(radii), [1, 2, 3, 4]): tied radii keep their
    tier order, so they count as correctly ordered (tau-b would count them as neither)."""
    radii = np.array([[0.1, 0.1, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5], [0.2, 0.1, 0.1, 0.3], [0.4, 0.3, 0.2, 0.1]])
    # argsort: [0 1 2 3] -> 1; [0 1 2 3] -> 1; [1 2 0 3]: 4 concordant, 2 discordant pairs -> 1/3; reversed -> -1.
    np.testing.assert_allclose(released_tau_d(radii), [1.0, 1.0, 1 / 3, -1.0])


def test_released_tau_d_matches_scipy_on_argsort():
    rng = np.random.default_rng(1)
    radii = rng.integers(0, 3, size=(300, 4)).astype(np.float32)  # many ties on purpose
    expected = [kendalltau(np.argsort(r, kind="stable"), [1, 2, 3, 4]).statistic for r in radii]
    np.testing.assert_allclose(released_tau_d(radii), expected, atol=1e-12)
    distinct = rng.permutation(np.tile(np.arange(4.0), (50, 1)).T).T + rng.random((50, 4)) * 0.1
    np.testing.assert_allclose(released_tau_d(distinct), kendall_tau_order(distinct), atol=1e-12)


def test_retrieve_tau_d_with_a_repeated_tier_is_released_value():
    """A chain whose T1 and T2 are the same text has two equal radii: tau_d is 1, not tau-b's 5/sqrt(30)."""
    root = torch.tensor([1.0, 0.0, 0.0])
    text_emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.3, 0.0], [1.0, 0.6, 0.0], [1.0, 0.9, 0.1]]), dim=1)
    cand = Candidates(["dog", "dog on grass", "a dog on grass"], np.array([[0, 0, 1, 2]]), ["img"], np.array([0]))
    out = retrieve(text_emb, text_emb[2:], root, cand, "released", steps=5)
    assert out["tau"].tolist() == [1.0]


# --- threshold search ------------------------------------------------------------------------


def test_threshold_predictions_hand_case():
    radii = torch.tensor([0.5, 1.0, 1.5, 1.2])
    sim = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.8, 0.1, 0.95, 0.9]])
    thresholds = torch.tensor([0.4, 0.5, 1.0, 1.2, 1.5])
    preds = threshold_predictions(sim, radii, thresholds)
    # image 0: nothing below 0.5; then text 0; text 1 (0.9) from 1.0 on.
    # image 1: text 0; text 0 (0.8 > 0.1); text 3 (0.9) at 1.2; text 2 (0.95) at 1.5.
    assert preds.tolist() == [[-1, 0, 1, 1, 1], [-1, 0, 0, 3, 2]]


def test_threshold_predictions_per_image_thresholds():
    radii = torch.tensor([0.5, 1.0, 1.5])
    sim = torch.tensor([[0.1, 0.9, 0.3], [0.1, 0.2, 0.3]])
    thresholds = torch.tensor([[0.5, 0.9], [0.5, 1.5]])
    assert threshold_predictions(sim, radii, thresholds).tolist() == [[0, 0], [0, 2]]


def test_tied_similarities_predict_the_first_index_like_numpy_argmax():
    radii = torch.tensor([0.5, 0.2, 0.5, 0.9])
    sim = torch.tensor([[0.7, 0.7, 0.7, 0.1], [0.1, 0.3, 0.3, 0.3]])
    preds = threshold_predictions(sim, radii, torch.tensor([0.2, 0.5, 0.9]))
    # image 0: text 1 alone, then texts 0, 1, 2 tie at 0.7 -> 0 (the first), text 3 is lower.
    # image 1: text 1; then 1 and 2 tie -> 1; then 1, 2, 3 tie -> 1.
    assert preds.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_threshold_predictions_with_ties_match_numpy_argmax_loop():
    gen = torch.Generator().manual_seed(3)
    radii = torch.randint(0, 6, (30,), generator=gen).float() / 5  # tied radii
    sim = torch.randint(0, 4, (12, 30), generator=gen).float() / 4  # many exactly tied similarities
    thresholds = torch.linspace(0.0, 1.0, 11)
    preds = threshold_predictions(sim, radii, thresholds).numpy()
    s, r = sim.numpy(), radii.numpy()
    for i in range(len(s)):
        for j, thr in enumerate(thresholds.numpy()):
            idx = np.flatnonzero(r <= thr)
            expected = idx[np.argmax(s[i, idx])] if len(idx) else -1
            assert preds[i, j] == expected, (i, j)


def test_paper_thresholds_run_from_the_root_to_the_nearest_text():
    radii = torch.tensor([0.4, 0.8, 1.2])
    sim = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.6]])
    thr = per_image_thresholds(sim, radii, 5)
    # image 0 is nearest text 1 (radius 0.8), image 1 nearest text 2 (radius 1.2); both start at 0.
    np.testing.assert_allclose(thr.numpy(), [[0.0, 0.2, 0.4, 0.6, 0.8], [0.0, 0.3, 0.6, 0.9, 1.2]])


def test_global_thresholds_span_all_radii():
    thr = global_thresholds(torch.tensor([0.7, 0.2, 1.1]), 4)
    np.testing.assert_allclose(thr.numpy(), [0.2, 0.5, 0.8, 1.1])


# --- precision / recall with repeated images and duplicate predictions ----------------------


def _two_image_case():
    # texts 0..7: two references for image 0; texts 8..11: the one reference of image 1.
    chain_ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    row_image = np.array([0, 0, 1])
    preds = np.array(
        [
            [0, 0, 5, 5, 9, 3],  # consecutive duplicates; 9 is another image's text
            [-1, 8, 8, 8, 8, 1],  # nothing at the first threshold
        ]
    )
    return preds, chain_ids, row_image


def test_precision_recall_multi_reference_hand_case():
    preds, chain_ids, row_image = _two_image_case()
    precision, recall = precision_recall(preds, chain_ids, row_image, n_texts=12)
    # image 0: set {0, 5, 9, 3}, GT = both chains -> 3/4; levels hit: 1 (0), 2 (5), 4 (3) -> 3/4.
    # image 1: set {8, 1}, GT = {8..11} -> 1/2; level 1 only -> 1/4.
    np.testing.assert_allclose(precision, [0.75, 0.5])
    np.testing.assert_allclose(recall, [0.75, 0.25])
    s = summarize(precision, recall, np.array([1.0, 0.0, 0.5]))
    assert s["precision"] == pytest.approx(0.625) and s["recall"] == pytest.approx(0.5)
    assert s["tau_d"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 0.625 * 0.5 / 1.125)


def test_paper_variant_drops_prediction_nearest_root():
    preds, chain_ids, row_image = _two_image_case()
    precision, recall = precision_recall(preds, chain_ids, row_image, n_texts=12, drop_first=True)
    # image 0: {5, 9, 3} -> 2/3, levels 2 and 4 -> 1/2; image 1: {1} -> 0, no level -> 0.
    np.testing.assert_allclose(precision, [2 / 3, 0.0])
    np.testing.assert_allclose(recall, [0.5, 0.0])


def test_predicted_chains_drop_consecutive_duplicates_only():
    texts = [f"t{i}" for i in range(4)]
    preds = np.array([[-1, 0, 0, 2, 2, 0, 3]])
    assert predicted_chains(preds, texts) == [["t0", "t2", "t0", "t3"]]
    assert predicted_chains(preds, texts, drop_first=True) == [["t2", "t0", "t3"]]
    assert kept_predictions(preds).tolist() == [[False, True, False, True, False, True, True]]


# --- data loading ----------------------------------------------------------------------------


def test_index_test_set_shares_duplicate_texts_and_images():
    test = RetrievalSet(
        chains=[("animal", "dog", "dog on grass", "a dog on grass"), ("animal", "cat", "cat sleeping", "a cat asleep")],
        image_refs=["http://x/COCO_val2014_000000000001.jpg"] * 2,
        origin="inline",
        sha256="0",
    )
    cand = index_test_set(test)
    assert cand.texts[0] == "animal" and len(cand.texts) == 7
    assert cand.chain_ids.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]
    assert cand.images == [test.image_refs[0]] and cand.row_image.tolist() == [0, 0]


def test_read_test_csv_names_the_bad_line(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('id,captions,image_url\n0,a => b => c => d,u0\n1,"a => b => c",u1\n')
    with pytest.raises(ValueError, match=r"t\.csv: line 3"):
        read_test_csv(f)
    f.write_text("id,text,url\n0,a,b\n")
    with pytest.raises(ValueError, match=r"t\.csv: line 1"):
        read_test_csv(f)


def test_load_test_set_from_dataset_rows():
    datasets = pytest.importorskip("datasets")
    rows = [{"positive": ["a", "b", "c", "d"], "image_ref": "img1.jpg"}, {"positive": ["a", "e", "f", "g"], "image_ref": "img2.jpg"}]
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
    test = load_test_set(dd)
    assert test.chains[1] == ("a", "e", "f", "g") and test.image_refs == ["img1.jpg", "img2.jpg"]
    assert test.sha256_of == "rows" and len(test.sha256) == 64


# --- vectorised search against a plain loop --------------------------------------------------


def _plain_loop(text_emb, image_emb, root, cand, steps, paper=False):
    """Independent per-image loop written after SPEC 4: the released evaluator, or with
    ``paper`` per-image thresholds from radius 0 up to the nearest text and the first prediction dropped."""
    radii = (text_emb - root).norm(dim=-1).double()
    precisions, recalls = [], []
    for i in range(len(cand.images)):
        s = text_emb @ image_emb[i]
        if paper:
            levels = np.linspace(0.0, float(radii[s.argmax()]), steps)
        else:
            levels = np.linspace(float(radii.min()), float(radii.max()), steps)
        preds = []
        for thr in levels:
            mask = radii <= thr
            idx = torch.nonzero(mask).flatten()
            if len(idx) == 0:
                continue
            t = int(idx[s[idx].argmax()])
            if not preds or preds[-1] != t:
                preds.append(t)
        if paper:
            preds = preds[1:]
        refs = [cand.chain_ids[r] for r in np.nonzero(cand.row_image == i)[0]]
        gt = {t for ref in refs for t in ref}
        sp = set(preds)
        precisions.append(len(sp & gt) / max(1, len(sp)))
        recalls.append(sum(any(ref[k] in sp for ref in refs) for k in range(4)) / 4)
    return np.array(precisions), np.array(recalls)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_vectorised_search_matches_plain_loop(variant):
    rng = torch.Generator().manual_seed(0)
    n_texts, n_images, d = 40, 9, 8
    text_emb = torch.nn.functional.normalize(torch.randn(n_texts, d, generator=rng), dim=-1)
    image_emb = torch.nn.functional.normalize(torch.randn(n_images, d, generator=rng), dim=-1)
    root = torch.nn.functional.normalize(torch.randn(d, generator=rng), dim=-1)
    chain_ids = torch.randint(0, n_texts, (14, 4), generator=rng).numpy()
    row_image = np.concatenate([np.arange(n_images), torch.randint(0, n_images, (5,), generator=rng).numpy()])
    cand = Candidates([f"t{i}" for i in range(n_texts)], chain_ids, [f"i{i}" for i in range(n_images)], row_image)
    out = retrieve(text_emb, image_emb, root, cand, variant, steps=50)
    p_loop, r_loop = _plain_loop(text_emb, image_emb, root, cand, 50, paper=variant == "paper")
    np.testing.assert_allclose(out["precision"], p_loop)
    np.testing.assert_allclose(out["recall"], r_loop)
    assert out["predictions"].shape == (n_images, 50)
    assert (out["predictions"] >= 0).all() if variant == "released" else (out["predictions"][:, 0] == -1).all()


def test_retrieve_geometric_hand_case():
    """Texts on a great circle through the root: radius grows with the angle from the root."""
    root = torch.tensor([1.0, 0.0, 0.0])

    def at(angle, z=0.0):
        return torch.nn.functional.normalize(torch.tensor([math.cos(angle), math.sin(angle), z]), dim=0)

    # one chain with radii 0.3, 0.6, 0.9, 1.2 (|e - r| = 2 sin(angle / 2)); an image nearest T4
    text_emb = torch.stack([at(2 * math.asin(r / 2)) for r in (0.3, 0.6, 0.9, 1.2)])
    image_emb = torch.stack([at(1.3, 0.1)])
    cand = Candidates(["T1", "T2", "T3", "T4"], np.array([[0, 1, 2, 3]]), ["img"], np.array([0]))
    out = retrieve(text_emb, image_emb, root, cand, "released", steps=7)
    np.testing.assert_allclose(out["radii"], [0.3, 0.6, 0.9, 1.2], atol=1e-6)
    # thresholds 0.3, 0.45, ..., 1.2: each tier enters in turn and is nearer the image than the last.
    assert predicted_chains(out["predictions"], cand.texts) == [["T1", "T2", "T3", "T4"]]
    assert out["precision"][0] == 1.0 and out["recall"][0] == 1.0 and out["tau"][0] == 1.0
    paper = retrieve(text_emb, image_emb, root, cand, "paper", steps=4)
    # nearest text to the image is T4; thresholds linspace(0, r(T4)) = 0, 0.4, 0.8, 1.2: nothing,
    # T1, T2, T4; T1, nearest the root, is dropped. (From r(T1) they would be 0.3, 0.6, 0.9, 1.2.)
    np.testing.assert_allclose(paper["thresholds"], [[0.0, 0.4, 0.8, 1.2]], atol=1e-6)
    assert paper["predictions"].tolist() == [[-1, 0, 1, 3]]
    assert predicted_chains(paper["predictions"], cand.texts, drop_first=True) == [["T2", "T4"]]
    assert paper["precision"][0] == 1.0 and paper["recall"][0] == 0.5


def test_retrieve_rejects_unknown_variant():
    cand = Candidates(["a"], np.array([[0, 0, 0, 0]]), ["i"], np.array([0]))
    with pytest.raises(ValueError, match="variant"):
        retrieve(torch.eye(1), torch.eye(1), torch.eye(1)[0], cand, "other")


# --- real data ------------------------------------------------------------------------------


def test_real_test_csv_parses():
    if not (DATA / "hierarcaps_test.csv").is_file():
        pytest.skip(f"real HierarCaps data not found at {DATA}")
    test = read_test_csv(DATA / "hierarcaps_test.csv")
    cand = index_test_set(test)
    assert len(test) == 1000 and len(cand.images) == 1000
    assert all(len(c) == 4 for c in test.chains)


def test_released_path_on_real_test_set_with_tiny_clip(tiny_hf_clip_dir):
    """Every one of the 1,000 test images is evaluated; values are in range and reproducible.

    The tiny CLIP sees 32x32 pixels, so images are decoded at a reduced JPEG scale (draft_size)
    to keep the test fast; the metric path is the released one.
    """
    if not (DATA / "hierarcaps_test.csv").is_file():
        pytest.skip(f"real HierarCaps data not found at {DATA}")
    from finetune.backends import load_backend
    from finetune.evaluation.common import encode_image_files, encode_texts
    from finetune.evaluation.retrieval import run_metrics, run_retrieval

    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    run = run_retrieval(backend, DATA / "hierarcaps_test.csv", DATA / "test_imgs", draft_size=64)
    metrics = run_metrics(run, model=str(tiny_hf_clip_dir))
    assert metrics["n_rows"] == 1000 and metrics["n_images"] == 1000
    assert run.predictions.shape == (1000, 50) and (run.predictions >= 0).all()
    assert len({p.name for p in run.image_paths}) == 1000
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert -1.0 <= metrics["tau_d"] <= 1.0
    assert metrics["variant"] == "released" and len(metrics["test_sha256"]) == 64
    json.dumps(metrics)  # the metrics JSON is serialisable as is
    # Deterministic: the same inputs embed to the same vectors, and the search gives the same numbers.
    again_img = encode_image_files(backend, run.image_paths[:40], batch_size=16, draft_size=64)
    torch.testing.assert_close(again_img, run.image_emb[:40], rtol=0, atol=1e-6)
    torch.testing.assert_close(encode_texts(backend, run.candidates.texts[:50]), run.text_emb[:50], rtol=0, atol=1e-6)
    out = retrieve(run.text_emb, run.image_emb, run.root, run.candidates, "released", 50)
    assert (out["predictions"] == run.predictions).all()
    assert summarize(out["precision"], out["recall"], out["tau"]) == summarize(run.precision, run.recall, run.tau)


def test_released_control_flow_gives_our_metrics_on_real_rows(tiny_hf_clip_dir, real_test_rows):
    """``benchmarks/bench_eval.released_loop`` follows the authors' evaluator step by step (pandas
    rows, COCO ids from a folder listing, one model call per row and per image, a masked torch
    arg-max per image and threshold): an independent implementation of the released semantics.
    On real rows and images our vectorised evaluator must give exactly its P, R and tau_d, and
    the benchmark's speed-ups are only meaningful if it does."""
    import importlib.util

    from finetune.backends import load_backend
    from finetune.evaluation.retrieval import evaluate_retrieval

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    csv = real_test_rows(80)
    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    released = bench.released_loop(backend, csv, DATA / "test_imgs", 50)
    ours = evaluate_retrieval(backend, csv, DATA / "test_imgs", "released", 50, str(tiny_hf_clip_dir), workers=0)
    assert 0 < released["precision"] and 0 < released["tau_d"] < 1  # not a degenerate case
    for key in ("precision", "recall", "tau_d"):
        assert ours[key] == pytest.approx(released[key], abs=1e-12), key


def test_cli_retrieval_writes_metrics_json(tiny_open_clip_dir, real_test_rows, tmp_path, capsys):
    from finetune.evaluation.cli import main

    subset = real_test_rows(30)
    out = tmp_path / "m" / "metrics.json"
    argv = ["retrieval", "--backend", "open-clip", "--model", str(tiny_open_clip_dir), "--test-csv", str(subset),
            "--images", str(DATA / "test_imgs"), "--variant", "paper", "--draft-size", "64", "--output", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    assert metrics["variant"] == "paper" and metrics["n_rows"] == 30 and metrics["backend"] == "open-clip"
    assert metrics["model"] == str(tiny_open_clip_dir) and metrics["versions"]["torch"]
    assert {"precision", "recall", "tau_d"} <= metrics.keys()
    assert not list(out.parent.glob(".*"))  # no temporary file left behind
    # a missing image folder is one clear error line and exit status 2
    argv[argv.index("--images") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    assert "images folder" in capsys.readouterr().err


def test_console_command_exits_fast_without_losing_output(tmp_path):
    """``hierarcaps-eval`` ends with os._exit: stdout (a pipe, block-buffered) must still arrive
    whole, the output file must be complete, and the exit status must be main()'s."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    metrics = {"task": "hierarcaps_retrieval", "precision": 0.25, "recall": 0.5, "f1": 1 / 3, "tau_d": 0.75}
    for name in ("before", "after"):
        (tmp_path / f"{name}.json").write_text(json.dumps(metrics))
    argv = [sys.executable, "-m", "finetune.evaluation.cli", "compare", f"before={tmp_path / 'before.json'}",
            f"after={tmp_path / 'after.json'}", "--output", str(tmp_path / "cmp.md")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "cmp.md").read_text()
    assert "before" in table and "after" in table and done.stdout.strip() == table.strip()
    argv[-3] = f"after={tmp_path / 'missing.json'}"
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "missing.json" in done.stderr


def test_text_batches_default_to_the_device(tiny_hf_clip_dir, monkeypatch):
    """Without a batch size, texts go 64 per call on the CPU (big batches of long texts run slower
    there) and 256 on a GPU; an explicit size always wins; the embeddings do not depend on it."""
    from finetune.backends import HFClipBackend, load_backend
    from finetune.evaluation.common import encode_texts, text_batch_size

    backend = load_backend("hf-clip", tiny_hf_clip_dir)
    assert text_batch_size(backend) == 64 and text_batch_size(backend, 7) == 7
    monkeypatch.setattr(backend, "device", torch.device("cuda"))
    assert text_batch_size(backend) == 256
    monkeypatch.undo()

    backend.embed_dim  # measured once, by encoding one text: not one of the calls counted below
    calls: list[int] = []
    original = HFClipBackend.encode_tokens
    monkeypatch.setattr(HFClipBackend, "encode_tokens", lambda self, tok: calls.append(len(tok["input_ids"])) or original(self, tok))
    texts = [f"a photo of {i} goats on an island" for i in range(150)]
    auto = encode_texts(backend, texts)
    assert max(calls) == 64 and sum(calls) == 150  # at most 64 per call (fewer where lengths jump)
    calls.clear()
    explicit = encode_texts(backend, texts, batch_size=150)
    assert max(calls) > 64 and sum(calls) == 150
    torch.testing.assert_close(auto, explicit, rtol=0, atol=1e-6)
