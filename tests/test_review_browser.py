"""The review page in a real headless Chromium (Playwright), against a real `tagger serve` process, products
tagged by the real pipeline with the default model, and Postgres read back after every action.

Screenshots of each page are saved under test-artifacts/review/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tagger.db import migrate
from tagger.db.engine import create_database
from tagger.events import read_catalog
from tagger.pipeline import Pipeline
from tagger.settings import REPO_ROOT, Settings
from tests.conftest import (CATALOG, DIM, TaggerProcess, pipeline_settings, query_rows, query_value, wait_until,
                            worker_env)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "review"
TOKEN = "browser-review-token"
REVIEWER = "Playwright Reviewer"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# Lazy images below the fold never load in a screenshot-sized viewport: wait only for those in view.
VISIBLE_IMAGES_LOADED = ("() => Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight)"
                         ".every(i => i.complete && i.naturalWidth > 0)")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def shot(page: Any, name: str, *, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def review_events() -> list[dict[str, Any]]:
    """Two seeded near-duplicate groups and a handful of other products."""
    events = list(read_catalog(CATALOG))
    copies = [e for e in events if (e.get("attributes") or {}).get("duplicate_of")][:2]
    originals = {e["attributes"]["duplicate_of"] for e in copies}
    chosen = [e for e in events if e["sku"] in originals] + copies
    return chosen + [e for e in events if e not in chosen][8:16]


@pytest.fixture(scope="module")
def tagged(server_settings: Settings, image_dir: Path) -> tuple[str, list[dict[str, Any]], Pipeline]:
    """A database of its own, the catalog tagged by the real pipeline and default model."""
    assert server_settings.database_url
    url = create_database(server_settings.database_url, f"tagger_review_browser_{os.getpid()}")
    migrate.upgrade(url, DIM)
    pipeline = Pipeline(pipeline_settings(url, image_dir))
    events = review_events()
    for event in events:
        assert pipeline.handle(event).status == "processed"
    return url, events, pipeline


class ServeProcess(TaggerProcess):
    """`python -m tagger.web.serve ARGS` in its own process group, logged like the other tagger processes."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tagger.web.serve", *args], stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        cwd=str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tagged: tuple[str, list[dict[str, Any]], Pipeline], server_settings: Settings, image_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `tagger serve` (uvicorn) on a free loopback port, with a review token."""
    url = tagged[0]
    port = free_port()
    env = worker_env(server_settings, url, image_dir, TAGGER_REVIEW_TOKEN=TOKEN)
    # `python -m tagger.web.serve` is what `tagger serve` runs (the `tagger` front end does not pass options
    # that start with "--" through to it).
    process = ServeProcess(["--port", str(port), "--no-relay", "--log-level", "warning"], env,
                           tmp_path_factory.mktemp("serve") / "serve.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.process.poll() is not None:
            raise RuntimeError(f"tagger serve exited:\n{process.log()}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(up, 90, "tagger serve to answer")
        yield base
    finally:
        process.stop()


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(30_000)
        tab = context.new_page()
        tab.goto(server + "/review")  # not signed in: sent to the sign-in form
        assert "/review/login" in tab.url
        tab.fill('input[name="who"]', REVIEWER)
        tab.fill('input[name="token"]', TOKEN)
        shot(tab, "login")
        tab.click('button[type="submit"]')
        tab.wait_for_url("**/review/queue")
        yield tab
        browser.close()


def wait_js(page: Any, function: str, timeout_s: float = 30) -> None:
    """Poll a JavaScript predicate with page.evaluate (the page's CSP forbids the eval that wait_for_function
    relies on)."""
    wait_until(lambda: page.evaluate(function), timeout_s, function)


def focused(page: Any) -> dict[str, str]:
    return page.eval_on_selector(".item.focused", "el => ({sku: el.dataset.sku, attribute: el.dataset.attribute, "
                                                  "top: el.dataset.top, state: el.dataset.state})")


def test_queue_loads_and_a_keyboard_approval_is_stored(page: Any, server: str,
                                                       tagged: tuple[str, list[dict[str, Any]], Pipeline]) -> None:
    url = tagged[0]
    page.goto(server + "/review/queue")  # pending tags, least confident first
    page.wait_for_selector(".card img")
    wait_js(page, VISIBLE_IMAGES_LOADED)
    shot(page, "queue")
    first = focused(page)
    assert first["state"] == "pending"
    page.keyboard.press("a")
    page.wait_for_selector(f'.item[data-sku="{first["sku"]}"][data-attribute="{first["attribute"]}"]'
                           '[data-state="approved"]')
    row = query_rows(url, "SELECT status, source, decided_by FROM tags WHERE sku = :s AND attribute = :a "
                          "AND value = :v", s=first["sku"], a=first["attribute"], v=first["top"])
    assert row == [("approved", "manual", REVIEWER)]
    assert focused(page) != first  # the focus moved on to the next undecided tag
    shot(page, "queue-after-approve")


def test_pick_another_label_with_the_keyboard(page: Any, server: str,
                                             tagged: tuple[str, list[dict[str, Any]], Pipeline]) -> None:
    url = tagged[0]
    page.goto(server + "/review/queue?show=undecided")
    for _ in range(60):  # walk with j to an undecided tag that lists an alternative
        if page.query_selector('.item.focused button.pick[data-key="1"]') and focused(page)["state"] != "approved":
            break
        page.keyboard.press("j")
    target = focused(page)
    alternative = page.get_attribute('.item.focused button.pick[data-key="1"]', "title")
    value = page.eval_on_selector('.item.focused button.pick[data-key="1"]', "b => b.form.value.value")
    assert alternative and value != target["top"]
    page.keyboard.press("1")
    page.wait_for_selector(f'.item[data-sku="{target["sku"]}"][data-attribute="{target["attribute"]}"]'
                           '[data-state="approved"]')
    rows = dict(query_rows(url, "SELECT value, status FROM tags WHERE sku = :s AND attribute = :a AND source = "
                                "'manual'", s=target["sku"], a=target["attribute"]))
    assert rows == {value: "approved", target["top"]: "rejected"}

    # "o" opens the full list of labels; Enter applies the one chosen.
    page.keyboard.press("j")
    other = focused(page)
    page.keyboard.press("o")
    options = page.eval_on_selector(".item.focused .pick-other select",
                                    "s => Array.from(s.options).map(o => o.value)")
    chosen = next(o for o in options if o != other["top"])
    page.select_option(".item.focused .pick-other select", chosen)
    page.keyboard.press("Enter")
    page.wait_for_selector(f'.item[data-sku="{other["sku"]}"][data-attribute="{other["attribute"]}"]'
                           '[data-state="approved"]')
    assert query_value(url, "SELECT status FROM tags WHERE sku = :s AND attribute = :a AND value = :v",
                       s=other["sku"], a=other["attribute"], v=chosen) == "approved"


def test_duplicate_pair_marked_different_is_not_proposed_again(page: Any, server: str,
                                                               tagged: tuple[str, list[dict[str, Any]], Pipeline]) -> None:
    url, events, pipeline = tagged
    page.goto(server + "/review/duplicates")
    page.wait_for_selector(".pair.focused")
    wait_js(page, VISIBLE_IMAGES_LOADED)
    shot(page, "duplicates")
    pair = page.eval_on_selector(".pair.focused", "el => [el.dataset.skuA, el.dataset.skuB]")
    page.keyboard.press("d")
    page.wait_for_selector(f'.pair.decided[data-sku-a="{pair[0]}"]')
    assert query_rows(url, "SELECT verdict, decided_by FROM duplicate_verdicts WHERE sku_a = :a AND sku_b = :b",
                      a=pair[0], b=pair[1]) == [("different", REVIEWER)]
    shot(page, "duplicates-after-verdict")

    # The products change and are tagged again: the matcher must not bring the pair back.
    by_sku = {e["sku"]: e for e in events}
    now = datetime.now(UTC).isoformat()
    for sku in pair:
        again = {**by_sku[sku], "type": "product.updated", "id": f"again-{sku}", "occurred_at": now,
                 "description": "new season " + (by_sku[sku].get("description") or "")}
        assert pipeline.handle(again).status == "processed"
    assert query_value(url, "SELECT count(*) FROM duplicate_matches WHERE sku_a = :a AND sku_b = :b",
                       a=pair[0], b=pair[1]) == 0
    page.goto(server + "/review/duplicates")
    assert page.query_selector(f'.pair[data-sku-a="{pair[0]}"][data-sku-b="{pair[1]}"]') is None
    page.goto(server + "/review/duplicates?show=decided")
    assert page.query_selector(f'.pair[data-sku-a="{pair[0]}"][data-sku-b="{pair[1]}"]') is not None


def test_heat_map_opens_as_an_overlay(page: Any, server: str, tagged: tuple[str, list[dict[str, Any]], Pipeline]) -> None:
    url = tagged[0]
    page.goto(server + "/review/queue?show=all")
    sku = focused(page)["sku"]
    with page.expect_response(lambda r: "/review/heatmap.png" in r.url, timeout=180_000) as answer:
        page.keyboard.press("w")
    response = answer.value
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    wait_js(page, "() => document.getElementById('heatmap').complete && "
                  "document.getElementById('heatmap').naturalWidth > 0", 60)
    assert "/review/why" in page.url
    shot(page, "why")
    assert query_value(url, "SELECT count(*) FROM review_heatmaps WHERE sku = :s", s=sku) == 1
    page.reload()  # the second time it comes from the cache
    wait_js(page, "() => document.getElementById('heatmap').naturalWidth > 0")


def test_an_approval_raises_the_confidence_of_the_next_similar_product(
        page: Any, server: str, tagged: tuple[str, list[dict[str, Any]], Pipeline]) -> None:
    """Approving a tag makes the product an exemplar; the attribute is re-tagged in the background from stored
    embeddings, and a similar product's confidence for that label goes up on the page."""
    url = tagged[0]
    pairs = query_rows(url, """
        SELECT a.sku, b.sku, a.attribute, a.value
        FROM tags a
        JOIN tags b ON b.attribute = a.attribute AND b.value = a.value AND b.sku <> a.sku
        JOIN embeddings ea ON ea.sku = a.sku JOIN embeddings eb ON eb.sku = b.sku
        WHERE a.rank = 1 AND b.rank = 1 AND a.source = 'machine' AND b.source = 'machine'
          AND a.status IN ('needs_review', 'accepted') AND b.status IN ('needs_review', 'accepted') AND b.score < 0.9
          AND NOT EXISTS (SELECT 1 FROM exemplars x WHERE x.attribute = a.attribute)
          AND NOT EXISTS (SELECT 1 FROM tags d WHERE d.sku IN (a.sku, b.sku) AND d.attribute = a.attribute
                          AND d.source = 'manual')
        ORDER BY ea.image_features <=> eb.image_features, a.sku, b.sku
        LIMIT 1""")
    assert pairs, "no two products share an undecided top label"
    approved_sku, next_sku, attribute, label = pairs[0]
    queue = f"{server}/review/queue?show=all&attribute={attribute}&label={label}"
    next_score = f'.item[data-sku="{next_sku}"][data-attribute="{attribute}"] li.proposal .score'

    page.goto(queue)
    before = page.inner_text(next_score)
    shot(page, "exemplar-before")
    page.click(f'.item[data-sku="{approved_sku}"][data-attribute="{attribute}"] button.approve')
    page.wait_for_selector(f'.item[data-sku="{approved_sku}"][data-attribute="{attribute}"][data-state="approved"]')
    assert query_rows(url, "SELECT source FROM exemplars WHERE sku = :s AND attribute = :a AND label = :l",
                      s=approved_sku, a=attribute, l=label) == [("review_approval",)]
    wait_until(lambda: (query_value(url, "SELECT exemplars FROM tags WHERE sku = :s AND attribute = :a AND value = :l",
                                    s=next_sku, a=attribute, l=label) or 0) > 0, 120, "the background re-tag")
    page.goto(queue)
    after = page.inner_text(next_score)
    shot(page, "exemplar-after")
    assert int(after.rstrip("%")) > int(before.rstrip("%")), (before, after)


def test_health_page_renders_charts_and_numbers(page: Any, server: str) -> None:
    page.goto(server + "/review/health")
    assert page.locator(".chart svg").count() == 3
    rows = page.eval_on_selector_all("#state-table tbody tr",
                                     "trs => trs.map(tr => Array.from(tr.cells).map(c => c.textContent.trim()))")
    assert rows and all(int(r[1]) > 0 for r in rows)
    assert any(not r[4].startswith("0 ") for r in rows)  # the approvals made above are counted
    page.set_viewport_size({"width": 1100, "height": 1000})
    shot(page, "health", full_page=True)
    page.set_viewport_size({"width": 1440, "height": 1000})
    lines = ["attribute\tproducts\tauto-accepted\tpending\tapproved\trejected"] + ["\t".join(r) for r in rows]
    overall = page.text_content("#agreement-overall") if page.query_selector("#agreement-overall") else "none"
    (ARTIFACTS / "health.txt").write_text("\n".join(lines) + f"\nagreement: {overall}\n", encoding="utf-8")
    assert os.path.getsize(ARTIFACTS / "health.png") > 10_000
