"""The review store, API, statistics and export without a browser (hierarcaps.review).

The browser test (tests/test_review_browser.py) drives the same code through the page.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hierarcaps.cli import main
from hierarcaps.formats import load_dataset_folder, read_release_csv
from hierarcaps.review.app import create_app
from hierarcaps.review.export import export_review, review_statistics, wilson_interval
from hierarcaps.review.items import ImageIndex, open_review, resolve_source
from hierarcaps.review.store import ConflictError, ReviewError, ReviewStore, StaleError, UnknownItemError

CURATED_TEXT = (
    "id,captions,image_url\n"
    "10,animal => goat => goat on island => a goat eating leaves on the island,http://x/img/COCO_val2014_000000000010.jpg\n"
    "11,food => pizza => pizza with olives => a pizza with olives on a plate,http://x/img/b.jpg\n"
    "12,vehicle => bus => red bus on street => a red bus driving down a city street,http://x/img/c.jpg\n"
    "13,sport => tennis => tennis player serving => a tennis player serving the ball,http://x/img/d.jpg\n"
)
EXPANDED_TEXT = (
    "positive,negative,image_url\n"
    "animal => goat => goat on island => a goat on the island,plant => frog => goat in city => goat on a boat,http://x/e.jpg\n"
)


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    path = tmp_path / "test.csv"
    path.write_text(CURATED_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def store(csv_path: Path) -> ReviewStore:
    return open_review(resolve_source(csv_path, "test"), None, None, 0)


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38415 = 0.71674, half 0.22655 -> [0.4902, 0.9433]
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94332, abs=1e-4)
    # all successes: the upper bound is 1 and the lower n / (n + z^2)
    low, high = wilson_interval(5, 5)
    assert high == 1.0 and low == pytest.approx(5 / (5 + 1.959963984540054**2))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_decisions_undo_and_log_is_append_only(store: ReviewStore) -> None:
    assert store.total == 4 and store.path == store.path.parent / "test.csv.review-test.sqlite"
    store.set_verdict(0, 2, "wrong_tier")
    with pytest.raises(ConflictError, match="cannot accept: T2"):
        store.decide(0, "accept")
    with pytest.raises(ConflictError, match="no tier is edited"):
        store.decide(0, "fix")
    store.edit_tier(0, 2, "goat with horns")
    fixed = store.decide(0, "fix")
    assert fixed.decision == "fix" and fixed.verdicts == ["valid", "wrong_tier", "valid", "valid"]
    assert store.decide(1, "accept").verdicts == ["valid"] * 4
    store.decide(2, "reject")
    position, state = store.undo()  # cancels the reject
    assert position == 2 and state.decision is None
    assert store.progress() == {"done": 2, "total": 4}
    # a verdict after a decision reopens the item
    assert store.set_verdict(1, 4, "not_entailed").decision is None
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET value = 'valid'")
        kinds = [k for (k,) in conn.execute("SELECT kind FROM events ORDER BY id")]
    # refused actions leave no row
    assert kinds == ["verdict", "edit", "decision", "decision", "decision", "undo", "verdict"]


def test_bad_actions_are_clear_errors(store: ReviewStore) -> None:
    with pytest.raises(UnknownItemError, match="no item 7: this review has 4 items"):
        store.set_verdict(7, 1, "valid")
    with pytest.raises(ReviewError, match="T3: the edit leaves the tier empty"):
        store.edit_tier(0, 3, "   ")
    with pytest.raises(ReviewError, match="contains the tier delimiter"):
        store.edit_tier(0, 3, "a => b")
    with pytest.raises(ReviewError, match="this item has no negatives"):
        store.set_verdict(0, 1, "contradiction_fails")
    with pytest.raises(ReviewError, match="verdict 'great'"):
        store.set_verdict(0, 1, "great")
    with pytest.raises(ReviewError, match="tier 5"):
        store.set_verdict(0, 5, "valid")
    with pytest.raises(ConflictError, match="nothing to undo"):
        store.undo()
    # an edit back to the original text is no edit
    store.edit_tier(0, 1, "creature")
    assert store.edit_tier(0, 1, "animal").edits == [None] * 4


def test_stale_tab_and_concurrent_writers(store: ReviewStore) -> None:
    seen = store.state(0).revision
    store.set_verdict(0, 1, "valid", base=seen)  # tab A
    with pytest.raises(StaleError, match="changed since this page loaded it"):
        store.set_verdict(0, 1, "wrong_tier", base=seen)  # tab B, loaded before A wrote
    # many writers at once (threads, each with its own connection): every action lands, none is lost
    errors: list[BaseException] = []

    def judge(tier: int) -> None:
        try:
            for _ in range(10):
                store.set_verdict(3, tier, "valid")
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=judge, args=(t,)) for t in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE position = 3").fetchone()[0] == 40
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_statistics_count_decided_items_only(store: ReviewStore) -> None:
    store.decide(0, "accept")
    store.set_verdict(1, 3, "not_entailed")
    store.decide(1, "reject")
    store.set_verdict(2, 1, "wrong_tier")  # undecided: not counted
    stats = review_statistics(store.states(), store.meta)
    assert stats["reviewed"] == 2 and stats["decisions"] == {"accept": 1, "fix": 0, "reject": 1}
    assert stats["fully_valid"]["valid"] == 1 and stats["fully_valid"]["n"] == 2
    assert stats["tiers"]["T3"] == {"valid": 1, "n": 2, "fraction": 0.5, "ci95": list(wilson_interval(1, 2))}
    # the rejected item judged only T3: the other tiers count the accepted item alone
    assert stats["tiers"]["T1"]["n"] == 1


def test_export_applies_fixes_drops_rejects_and_round_trips(store: ReviewStore, tmp_path: Path, capsys) -> None:
    store.set_verdict(0, 4, "not_entailed")
    store.edit_tier(0, 4, "a goat eating leaves")
    store.decide(0, "fix")
    store.decide(1, "reject")
    store.decide(2, "accept")
    result = export_review(store, tmp_path / "out")
    lines = result.csv.read_text(encoding="utf-8").splitlines()
    assert lines == [
        "id,captions,image_url",
        "10,animal => goat => goat on island => a goat eating leaves,http://x/img/COCO_val2014_000000000010.jpg",
        "12,vehicle => bus => red bus on street => a red bus driving down a city street,http://x/img/c.jpg",
    ]
    test = load_dataset_folder(result.dataset)["test"]
    assert test["caption"][0] == "a goat eating leaves"
    review = json.loads(test["provenance"][0])["review"]
    assert review["decision"] == "fix" and review["original_tiers"] == {"T4": "a goat eating leaves on the island"}
    assert json.loads(result.stats_path.read_text())["fully_valid"] == result.stats["fully_valid"]
    # the export is a release CSV: convert reads it back to the same rows
    assert main(["convert", str(result.csv), str(tmp_path / "again")]) == 0
    again = load_dataset_folder(tmp_path / "again")["test"]
    assert again["positive"] == test["positive"] and again["id"] == ["10", "12"]


def test_api_needs_token_and_answers_errors_as_json(store: ReviewStore, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "COCO_val2014_000000000010.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    client = TestClient(create_app(store, ImageIndex(images), "secret"))
    assert client.get("/").status_code == 403
    assert client.get("/api/items/0", params={"token": "wrong"}).status_code == 403
    head = {"X-Review-Token": "secret"}
    item = client.get("/api/items/0", headers=head).json()
    assert item["positive"][0] == "animal" and item["image"] == "api/items/0/image"
    assert client.get("/api/items/0/image", params={"token": "secret"}).content.startswith(b"\xff\xd8")
    missing = client.get("/api/items/1/image", headers=head)
    assert missing.status_code == 404 and "is not available locally (pass --images DIR)" in missing.json()["error"]
    unknown = client.post("/api/items/9/verdict", headers=head, json={"tier": 1, "verdict": "valid"})
    assert unknown.status_code == 404 and unknown.json() == {"error": "no item 9: this review has 4 items, 0..3"}
    empty = client.post("/api/items/0/edit", headers=head, json={"tier": 2, "text": ""})
    assert empty.status_code == 400 and "leaves the tier empty" in empty.json()["error"]
    ok = client.post("/api/items/0/verdict", headers=head, json={"tier": 1, "verdict": "valid", "base": 0})
    assert ok.json()["state"]["verdicts"][0] == "valid"
    stale = client.post("/api/items/0/verdict", headers=head, json={"tier": 1, "verdict": "wrong_tier", "base": 0})
    assert stale.status_code == 409 and stale.json()["item"]["state"]["verdicts"][0] == "valid"
    assert client.post("/api/undo", headers=head).json()["state"]["verdicts"][0] is None


def test_cli_errors_are_one_line_and_status_2(csv_path: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ds"
    assert main(["convert", str(csv_path), str(folder)]) == 0
    capsys.readouterr()
    assert main(["review", str(folder), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hierarcaps review: error: ") and "has no split 'train'; it has ['test']" in err
    assert err.count("\n") == 1
    assert main(["review", str(tmp_path / "nothing")]) == 2
    assert "no such build, dataset folder or release CSV" in capsys.readouterr().err
    assert main(["review", str(csv_path), "--sample", "9"]) == 2
    assert "--sample 9: the split has 4 items" in capsys.readouterr().err
    assert main(["review", "export", str(csv_path), "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "none.sqlite: no review database; review first" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()
    # a database started for one sample refuses another
    db = tmp_path / "r.sqlite"
    open_review(resolve_source(csv_path, "test"), db, 2, 0)
    assert main(["review", "export", str(csv_path), "--db", str(db), "--sample", "3"]) == 2
    assert "started with --split test --sample 2 --seed 0, not --split test --sample 3 --seed 0" in capsys.readouterr().err
    assert main(["review", "export", str(csv_path), "--db", str(db), "--sample", "2"]) == 2
    assert "no item has been decided yet" in capsys.readouterr().err


def test_an_unfinished_build_is_refused_and_a_finished_one_is_a_build(csv_path: Path, tmp_path: Path, capsys) -> None:
    """Review reads a build as every command does (hierarcaps.formats.find_build_dataset): same one-line refusal."""
    from hierarcaps.formats import UnfinishedBuildError, find_build_dataset
    from hierarcaps.stagedir import SUCCESS

    build = tmp_path / "build"
    assert main(["convert", str(csv_path), str(build / "final" / "dataset")]) == 0
    with pytest.raises(UnfinishedBuildError) as unfinished:
        find_build_dataset(build)
    capsys.readouterr()
    for given in (build, build / "final"):
        assert main(["review", str(given)]) == 2
        assert capsys.readouterr().err == f"hierarcaps review: error: {unfinished.value}\n"
    assert not (build / "review").exists()
    (build / "final" / SUCCESS).touch()
    for given in (build, build / "final"):
        source = resolve_source(given, "test")
        assert (source.kind, source.path, source.build_dir) == ("build", build, build)
    assert open_review(resolve_source(build, "test"), None, None, 0).path == build / "review" / "test.sqlite"


def test_train_items_show_negatives_and_take_contradiction_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(EXPANDED_TEXT, encoding="utf-8")
    store = open_review(resolve_source(path, "train"), None, None, 0)
    assert store.rows[0]["negative"][1] == "frog"
    store.set_verdict(0, 2, "contradiction_fails")
    store.edit_tier(0, 2, "goat")  # unchanged text: no edit
    with pytest.raises(ConflictError):
        store.decide(0, "accept")
    store.decide(0, "reject")
    with pytest.raises(ReviewError, match="every decided item was rejected"):
        export_review(store, tmp_path / "out")
    assert read_release_csv(path).num_rows == 1


def test_images_from_a_fetch_images_mapping_files_tar_members_and_failures(store: ReviewStore, tmp_path: Path) -> None:
    """A folder as ``hierarcaps fetch-images`` writes it: ``images.parquet`` maps refs to files or tar members."""
    import io
    import tarfile

    import pandas as pd

    fetched = tmp_path / "fetched"
    (fetched / "shards" / "00000").mkdir(parents=True)
    (fetched / "shards" / "00000" / "000000000.jpg").write_bytes(b"\xff\xd8 file image")
    member = b"\xff\xd8 tar member image"
    with tarfile.open(fetched / "shards" / "00001.tar", "w") as tar:
        info = tarfile.TarInfo("000010000.jpg")
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    with tarfile.open(fetched / "shards" / "00001.tar") as tar:
        offset = tar.getmember("000010000.jpg").offset_data
    refs = [r["image_ref"] for r in store.rows]
    pd.DataFrame({
        "image_ref": refs,
        "status": ["ok", "ok", "not_found", "ok"],
        "path": ["shards/00000/000000000.jpg", "shards/00001.tar", None, "shards/00000/000000000.jpg"],
        "offset": pd.array([None, offset, None, None], dtype="Int64"),
        "size": pd.array([None, len(member), None, None], dtype="Int64"),
    }).to_parquet(fetched / "images.parquet")
    client = TestClient(create_app(store, ImageIndex(fetched), "t"))
    assert client.get("/api/items/0/image?token=t").content == b"\xff\xd8 file image"
    answer = client.get("/api/items/1/image?token=t")
    assert answer.content == member and answer.headers["content-type"] == "image/jpeg"
    failed = client.get("/api/items/2?token=t").json()
    assert failed["image"] is None and failed["image_missing"] == "fetch-images could not fetch it (not_found)"
    assert "not_found" in client.get("/api/items/2/image?token=t").json()["error"]


@pytest.mark.slow
def test_export_of_a_build_records_the_review_in_card_and_manifest(smoke_build_dir: Path, tmp_path: Path) -> None:
    """Without a browser: the card and manifest of a (smoke) build say how valid the reviewed split is."""
    import shutil

    from hierarcaps.publish import check_publishable, publish

    build = tmp_path / "build"
    shutil.copytree(smoke_build_dir / "final", build / "final")
    store = open_review(resolve_source(build, "test"), None, 3, 1)
    assert store.path == build / "review" / "test.sqlite"
    store.decide(0, "accept")
    store.decide(1, "accept")
    store.set_verdict(2, 2, "wrong_tier")
    store.decide(2, "reject")
    result = export_review(store, build / "review" / "export-test", build)
    card = (build / "final" / "README.md").read_text(encoding="utf-8")
    low, high = wilson_interval(2, 3)
    assert f"**Fully valid: 66.7% ({100 * low:.1f}–{100 * high:.1f}%)**" in card
    assert "| T2 | 2 | 3 | 66.7% " in card and "accepted 2, fixed 0, rejected 1" in card
    assert card.index("## Human review") < card.index("## Limitations")
    manifest = json.loads((build / "final" / "manifest.json").read_text())
    assert manifest["review"]["test"] == json.loads(result.stats_path.read_text())
    check_publishable(build, allow_plumbing_check=True)  # the manifest's hashes cover the new card
    sent = publish(build, "lab/x", dry_run_dir=tmp_path / "upload", allow_plumbing_check=True)
    assert "**Fully valid: 66.7%" in (sent.dry_run_dir / "README.md").read_text(encoding="utf-8")
    assert len(result.csv.read_text(encoding="utf-8").splitlines()) == 3  # header + the two accepted items


def test_sigkill_during_a_burst_of_writes_loses_no_answered_action(store: ReviewStore) -> None:
    """A writer process is killed mid-stream: every action it reported as stored is in the database."""
    import signal
    import subprocess
    import sys

    writer = (
        "import sys\nfrom hierarcaps.review.store import ReviewStore\n"
        "store = ReviewStore(sys.argv[1])\n"
        "for i in range(100000):\n"
        "    state = store.set_verdict(i % 4, i % 4 + 1, ('valid', 'wrong_tier')[i % 2])\n"
        "    print(state.revision, flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(store.path)], stdout=subprocess.PIPE, text=True)
    answered = [int(process.stdout.readline()) for _ in range(50)]  # type: ignore[union-attr]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    with sqlite3.connect(store.path) as conn:
        stored = {i for (i,) in conn.execute("SELECT id FROM events")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert set(answered) <= stored and len(stored) >= 50
