"""The review page in a real browser: Playwright driving Debian's Chromium (``apt-get install chromium``).

Playwright's own browser download is not reachable on our machines, so the test points it at the
system browser and skips, saying so, when there is none. The server runs as a subprocess of
``hierarcaps review`` exactly as a user starts it, so SIGKILL really kills it mid-review.
Set ``HIERARCAPS_REVIEW_SCREENSHOTS=DIR`` to keep the screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from hierarcaps.cli import main
from hierarcaps.review.export import wilson_interval

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RELEASE_DIR = Path(__file__).parents[2] / "shared" / "data" / "hierarcaps"
CURATED = RELEASE_DIR / "hierarcaps_test.csv"
TEST_IMAGES = RELEASE_DIR / "test_imgs"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no system Chromium (apt-get install chromium); "
                       "Playwright's own browser download is not reachable here"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}


class ReviewServer:
    """``hierarcaps review ...`` in a subprocess; ``url`` is the URL it printed."""

    def __init__(self, args: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hierarcaps.cli", "review", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        )
        lines = []
        for line in self.process.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("open http://127.0.0.1:"):
                self.url = line.split()[1]
                return
        raise AssertionError(f"the review server did not start: {''.join(lines)}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def browser() -> Iterator["sync_api.Browser"]:
    sync_api.expect.set_options(timeout=30_000)  # a loaded 2-core CI machine answers slowly
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _screenshot(page: "sync_api.Page", tmp_path: Path, name: str) -> Path:
    keep = os.environ.get("HIERARCAPS_REVIEW_SCREENSHOTS")
    folder = Path(keep) if keep else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def _wait_item(page: "sync_api.Page", index: int, decision: str | None = None) -> None:
    page.wait_for_function(f"() => location.hash === '#item={index}'")
    if decision is not None:
        sync_api.expect(page.locator("#decision")).to_have_text(decision)


def _states(page: "sync_api.Page", total: int) -> list[dict]:
    """Every item's state as the server answers it (through the page's own token)."""
    return page.evaluate(
        """async (total) => { const out = []; const token = new URLSearchParams(location.search).get('token');
        for (let i = 0; i < total; i++) { const r = await fetch(`api/items/${i}?token=${token}`); out.push((await r.json()).state); }
        return out; }""",
        total,
    )


@pytest.mark.skipif(not (CURATED.is_file() and TEST_IMAGES.is_dir()),
                    reason=f"the authors' curated test CSV and images are not at {RELEASE_DIR}")
def test_review_real_test_items_with_keyboard_survives_kill_and_exports(browser, tmp_path: Path, capsys) -> None:
    db = tmp_path / "review.sqlite"
    args = [str(CURATED), "--split", "test", "--sample", "3", "--seed", "7", "--db", str(db)]
    server = ReviewServer([*args, "--images", str(TEST_IMAGES)])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server.url)
    _wait_item(page, 0, "open")
    sync_api.expect(page.locator("#progress")).to_have_text("0 / 3 done")
    page.wait_for_function("() => document.getElementById('image').complete")
    assert page.evaluate("document.getElementById('image').naturalWidth") > 0
    tiers = [page.locator(f"#tier-{i} .text").inner_text() for i in (1, 2, 3, 4)]
    assert all(tiers)
    shot = _screenshot(page, tmp_path, "review-real-item0.png")
    assert shot.is_file()

    # item 0: four valid verdicts by keyboard (selection moves down), then accept
    for i in (1, 2, 3, 4):
        page.keyboard.press("v")
        sync_api.expect(page.locator(f"#tier-{i}")).to_have_attribute("data-verdict", "valid")
    page.keyboard.press("a")
    _wait_item(page, 1, "open")
    sync_api.expect(page.locator("#progress")).to_have_text("1 / 3 done")
    # item 1: T2 is at the wrong level; edit it, then fix
    page.keyboard.press("2")
    page.keyboard.press("w")
    sync_api.expect(page.locator("#tier-2")).to_have_attribute("data-verdict", "wrong_tier")
    page.keyboard.press("2")
    page.keyboard.press("e")
    page.locator("#edit-input").fill("reviewed tier two")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#tier-2 .text")).to_have_text("reviewed tier two")
    page.keyboard.press("f")
    _wait_item(page, 2, "open")
    # item 2: T3 not entailed, reject; undo the reject; reject again
    page.keyboard.press("3")
    page.keyboard.press("n")
    page.keyboard.press("r")
    sync_api.expect(page.locator("#progress")).to_have_text("3 / 3 done")
    page.keyboard.press("u")
    sync_api.expect(page.locator("#decision")).to_have_text("open")
    sync_api.expect(page.locator("#progress")).to_have_text("2 / 3 done")
    sync_api.expect(page.locator("#tier-3")).to_have_attribute("data-verdict", "not_entailed")
    page.keyboard.press("r")
    sync_api.expect(page.locator("#progress")).to_have_text("3 / 3 done")
    # an empty edit is refused with a message, and nothing is stored
    page.keyboard.press("1")
    page.keyboard.press("e")
    page.locator("#edit-input").fill("  ")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#message")).to_contain_text("the edit leaves the tier empty")
    page.keyboard.press("Escape")

    # reload keeps the state
    page.reload()
    _wait_item(page, 2, "REJECT")
    page.keyboard.press("ArrowLeft")
    _wait_item(page, 1, "FIX")
    sync_api.expect(page.locator("#tier-2 .original")).to_have_count(1)
    saved = _states(page, 3)

    # SIGKILL the server, restart it on the same database: every saved verdict is there
    server.kill()
    server = ReviewServer([*args, "--images", str(TEST_IMAGES)])
    page.goto(server.url)
    _wait_item(page, 0, "ACCEPT")  # no open item left: the page starts at the first
    sync_api.expect(page.locator("#progress")).to_have_text("3 / 3 done")
    assert _states(page, 3) == saved
    assert [s["decision"] for s in saved] == ["accept", "fix", "reject"]
    server.kill()

    # export: fixes applied, the rejected item dropped, statistics as judged
    out = tmp_path / "export"
    assert main(["review", "export", *args, "--output", str(out)]) == 0
    lines = (out / "test.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,captions,image_url" and len(lines) == 3
    assert lines[2].split(" => ")[1] == "reviewed tier two"
    stats = json.loads((out / "review_stats.json").read_text())
    assert stats["decisions"] == {"accept": 1, "fix": 1, "reject": 1}
    assert (stats["fully_valid"]["valid"], stats["fully_valid"]["n"]) == (1, 3)
    assert {t: (e["valid"], e["n"]) for t, e in stats["tiers"].items()} == {
        "T1": (2, 2), "T2": (1, 2), "T3": (2, 3), "T4": (2, 2)
    }
    assert stats["tiers"]["T2"]["ci95"] == pytest.approx(wilson_interval(1, 2))
    assert "fully valid 1/3 = 33.3% (95% Wilson CI 6.1-79.2%)" in capsys.readouterr().out
    # the export round-trips through hierarcaps convert
    assert main(["convert", str(out / "test.csv"), str(tmp_path / "ds")]) == 0
    assert main(["convert", str(tmp_path / "ds"), str(tmp_path / "back.csv")]) == 0
    assert (tmp_path / "back.csv").read_bytes() == (out / "test.csv").read_bytes()


def test_review_smoke_build_train_items_and_card(browser, smoke_build_dir: Path, tmp_path: Path) -> None:
    """Train items of a smoke build show their negatives; the export lands in the card and manifest."""
    from datasets import load_from_disk
    from PIL import Image

    from hierarcaps.card import render_card
    from hierarcaps.publish import check_publishable, publish

    build = tmp_path / "build"
    shutil.copytree(smoke_build_dir / "final", build / "final")
    train = load_from_disk(str(build / "final" / "dataset"))["train"]
    images = tmp_path / "images"  # the smoke build's refs are example.org URLs: make local files for them
    images.mkdir()
    for ref in train["image_ref"]:
        Image.new("RGB", (64, 48), (40, 120, 200)).save(images / ref.rsplit("/", 1)[-1])
    args = [str(build), "--split", "train", "--sample", "2", "--seed", "0"]
    server = ReviewServer([*args, "--images", str(images)])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server.url)
    _wait_item(page, 0, "open")
    sync_api.expect(page.locator(".tier .negative")).to_have_count(4)
    page.wait_for_function("() => document.getElementById('image').complete")
    assert page.evaluate("document.getElementById('image').naturalWidth") == 64
    _screenshot(page, tmp_path, "review-smoke-train.png")
    # a second tab judges T1 first: the first tab's stale action is refused and it shows the new state
    other = browser.new_page()
    other.goto(server.url)
    _wait_item(other, 0, "open")
    other.keyboard.press("v")
    sync_api.expect(other.locator("#tier-1")).to_have_attribute("data-verdict", "valid")
    page.keyboard.press("c")
    sync_api.expect(page.locator("#message")).to_contain_text("changed since this page loaded it")
    sync_api.expect(page.locator("#tier-1")).to_have_attribute("data-verdict", "valid")
    page.keyboard.press("1")
    page.keyboard.press("c")  # T1's negative does not contradict it
    sync_api.expect(page.locator("#tier-1")).to_have_attribute("data-verdict", "contradiction_fails")
    page.keyboard.press("a")
    sync_api.expect(page.locator("#message")).to_contain_text("cannot accept: T1")
    page.keyboard.press("r")
    _wait_item(page, 1, "open")
    page.keyboard.press("a")
    sync_api.expect(page.locator("#progress")).to_have_text("2 / 2 done")
    server.kill()
    assert (build / "review" / "train.sqlite").is_file()  # beside the build

    manifest = json.loads((build / "final" / "manifest.json").read_text())
    card_inputs = {k: manifest[k] for k in ("settings", "counts", "models", "stages", "sampling")}
    # the card is re-rendered from the manifest: without a review it is the build's own card
    assert render_card(**card_inputs) == (build / "final" / "README.md").read_text(encoding="utf-8")
    assert main(["review", "export", *args]) == 0
    exported = (build / "review" / "export-train" / "train.csv").read_text(encoding="utf-8").splitlines()
    assert exported[0] == "id,positive,negative,image_url" and len(exported) == 2
    card = (build / "final" / "README.md").read_text(encoding="utf-8")
    assert "## Human review" in card and "**Fully valid: 50.0% (9.5–90.5%)**" in card
    manifest = json.loads((build / "final" / "manifest.json").read_text())
    assert manifest["review"]["train"]["fully_valid"]["valid"] == 1
    check_publishable(build, allow_plumbing_check=True)  # hashes match the re-rendered card
    sent = publish(build, "lab/x", dry_run_dir=tmp_path / "upload", allow_plumbing_check=True)
    assert "## Human review" in (sent.dry_run_dir / "README.md").read_text(encoding="utf-8")
