"""The review page's API over the real app, a real Postgres+pgvector and products tagged by the real default model.

One catalog (products from samples/catalog, including seeded near-duplicates) is processed once for the module
by the real pipeline; tests then sign in, decide, and read the results back from Postgres.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tagger import retag
from tagger.db import migrate
from tagger.db.engine import create_database, get_engine
from tagger.events import read_catalog
from tagger.pipeline import Pipeline
from tagger.review import (
    DuplicatePairView,
    InvalidRequest,
    NothingToDecide,
    TagRow,
    UnknownLabel,
    duplicate_groups,
    parse_filter,
    plan_decision,
)
from tagger.settings import REPO_ROOT, Settings
from tagger.taxonomy.loader import load_taxonomies
from tagger.web.app import create_app
from tagger.web.review.access import Access
from tests.conftest import CATALOG, DIM, SAMPLES, pipeline_settings, query_rows, query_value

TOKEN = "review-token-for-tests"
TAXONOMIES = load_taxonomies(REPO_ROOT / "taxonomies")


def review_events() -> list[dict[str, Any]]:
    """Three seeded near-duplicate groups (originals and altered copies) and a few other products."""
    events = list(read_catalog(CATALOG))
    copies = [e for e in events if (e.get("attributes") or {}).get("duplicate_of")][:3]
    originals = {e["attributes"]["duplicate_of"] for e in copies}
    chosen = [e for e in events if e["sku"] in originals] + copies
    return chosen + [e for e in events if e not in chosen][:8]


def updated(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    later = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    return {**event, "type": "product.updated", "id": None, "occurred_at": later, **changes}


@pytest.fixture(scope="module")
def catalog(server_settings: Settings, image_dir: Path) -> Iterator[tuple[str, Pipeline, list[dict[str, Any]]]]:
    assert server_settings.database_url
    url = create_database(server_settings.database_url, f"tagger_review_{os.getpid()}")
    migrate.upgrade(url, DIM)
    pipeline = Pipeline(pipeline_settings(url, image_dir))
    events = review_events()
    for event in events:
        outcome = pipeline.handle(event)
        assert outcome.status == "processed", outcome
    yield url, pipeline, events


@pytest.fixture(scope="module")
def url(catalog: tuple[str, Pipeline, list[dict[str, Any]]]) -> str:
    return catalog[0]


def app_settings(server_settings: Settings, url: str, **overrides: Any) -> Settings:
    return Settings(database_url=url, broker_url=server_settings.broker_url, data_dir=server_settings.data_dir,
                    image_roots=(SAMPLES,), taxonomy_dir=REPO_ROOT / "taxonomies", review_token=TOKEN,
                    ).with_overrides(**overrides)


def make_client(server_settings: Settings, url: str, client: tuple[str, int] = ("testclient", 50000),
                **overrides: Any) -> TestClient:
    app = create_app(app_settings(server_settings, url, **overrides), sender=lambda: (lambda events: None),
                     relay=False)
    return TestClient(app, client=client, follow_redirects=False)


@pytest.fixture(scope="module")
def client(server_settings: Settings, url: str) -> Iterator[TestClient]:
    with make_client(server_settings, url) as c:
        yield c


def sign_in(client: TestClient, who: str = "Ana", token: str | None = TOKEN) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    page = client.get("/review/login")
    assert page.status_code == 200, page.text
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    fields = {"nonce": nonce, "who": who, "next": "/review/queue"}
    if token is not None:
        fields["token"] = token
    answer = client.post("/review/login", data=fields)
    assert answer.status_code == 303, answer.text
    queue = client.get("/review/queue")
    assert queue.status_code == 200, queue.text
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', queue.text).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def csrf(client: TestClient) -> str:
    return sign_in(client)


def decide(client: TestClient, csrf: str | None, **fields: str) -> Any:
    data = dict(fields)
    if csrf is not None:
        data["csrf"] = csrf
    return client.post("/review/decide", data=data, headers={"Accept": "application/json"})


def undecided(url: str, status: str = "needs_review", attribute: str | None = None) -> list[tuple[str, str, str]]:
    """(sku, attribute, machine's label) of items nobody decided whose proposal has ``status``."""
    return [tuple(r) for r in query_rows(url, """
        SELECT sku, attribute, value FROM tags t
        WHERE rank = 1 AND status = :status AND (CAST(:attribute AS text) IS NULL OR attribute = :attribute)
          AND NOT EXISTS (SELECT 1 FROM tags d WHERE d.sku = t.sku AND d.attribute = t.attribute
                          AND d.source = 'manual')
        ORDER BY sku, attribute""", status=status, attribute=attribute)]


def item(url: str, sku: str, attribute: str) -> dict[str, tuple[Any, ...]]:
    rows = query_rows(url, "SELECT value, status, source, decided_by, decided_at, score, rank FROM tags "
                           "WHERE sku = :s AND attribute = :a", s=sku, a=attribute)
    return {r[0]: tuple(r[1:]) for r in rows}


def decisions(url: str) -> int:
    return int(query_value(url, "SELECT count(*) FROM review_decisions"))


# ---- pure rules ------------------------------------------------------------------------------------------


def rows(*spec: tuple[str, float, int, str]) -> list[TagRow]:
    return [TagRow(v, s, r, st, "machine", "attributes", None, "m", "v1") for v, s, r, st in spec]


COLOUR = TAXONOMIES.attribute("colour")


def test_plan_pick_approves_the_chosen_label_and_rejects_the_proposal() -> None:
    current = rows(("blue", 0.41, 1, "needs_review"), ("navy", 0.30, 2, "alternative"))
    plan = plan_decision(COLOUR, current, "pick", "navy")
    assert plan.action == "pick" and plan.chosen == "navy"
    assert {(w.value, w.status, w.insert) for w in plan.writes} == {("navy", "approved", False),
                                                                    ("blue", "rejected", False)}
    added = plan_decision(COLOUR, current, "pick", "black")
    assert {(w.value, w.status, w.insert, w.rank) for w in added.writes} == {("black", "approved", True, 0),
                                                                             ("blue", "rejected", False, 1)}
    assert plan_decision(COLOUR, current, "pick", "blue").action == "approve"


def test_plan_refuses_what_names_nothing() -> None:
    current = rows(("blue", 0.41, 1, "needs_review"))
    with pytest.raises(UnknownLabel, match="'teal' is not a label of colour"):
        plan_decision(COLOUR, current, "pick", "teal")
    with pytest.raises(UnknownLabel, match="parent label"):
        plan_decision(TAXONOMIES.attribute("category"), [], "pick", "apparel")
    with pytest.raises(NothingToDecide, match="use pick"):
        plan_decision(COLOUR, current, "approve", "black")
    with pytest.raises(InvalidRequest, match="unknown"):
        plan_decision(COLOUR, current, "delete", None)
    approved = [TagRow("blue", 0.41, 1, "approved", "manual", "attributes")]
    assert not plan_decision(COLOUR, approved, "approve", None).changes_anything


def test_duplicate_groups_are_connected_components() -> None:
    pairs = [DuplicatePairView("A", "B", 0.95), DuplicatePairView("B", "C", 0.91), DuplicatePairView("X", "Y", 0.99)]
    groups = duplicate_groups(pairs)
    assert [g.skus for g in groups] == [("X", "Y"), ("A", "B", "C")]
    assert [p.sku_b for p in groups[1].pairs] == ["B", "C"]


def test_filters_refuse_unknown_values() -> None:
    assert parse_filter({"attribute": "colour", "label": "navy", "band": "low"}, TAXONOMIES).label == "navy"
    for params, message in (({"attribute": "shoe_size"}, "not in the taxonomies"),
                            ({"label": "navy"}, "needs an attribute"), ({"band": "sure"}, "band"),
                            ({"category": "spaceships"}, "category"), ({"page": "0"}, "page")):
        with pytest.raises(InvalidRequest, match=message):
            parse_filter(params, TAXONOMIES)


def test_session_cookies_are_signed_and_expire() -> None:
    clock = [1_000_000.0]
    access = Access("t", now=lambda: clock[0])
    cookie = access.issue("Ana")
    assert access.session(cookie).who == "Ana"  # type: ignore[union-attr]
    assert access.session(cookie[:-2] + "xx") is None
    assert Access("another token").session(cookie) is None  # rotating the token signs everybody out
    clock[0] += 13 * 3600
    assert access.session(cookie) is None


# ---- access ----------------------------------------------------------------------------------------------


def test_pages_need_a_sign_in_with_the_configured_token(server_settings: Settings, url: str) -> None:
    with make_client(server_settings, url) as c:
        page = c.get("/review/queue?show=all")
        assert page.status_code == 303 and page.headers["location"].startswith("/review/login?next=/review/queue")
        assert c.get("/review/heatmap.png?sku=x&attribute=colour&label=red").status_code == 401
        login = c.get("/review/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', login.text).group(1)  # type: ignore[union-attr]
        wrong = c.post("/review/login", data={"nonce": nonce, "who": "Eve", "token": "guess"})
        assert wrong.status_code == 401 and "not the one configured" in wrong.text
        assert "tagger_review=" not in wrong.headers.get("set-cookie", "")
        forged = c.post("/review/login", data={"nonce": "forged", "who": "Eve", "token": TOKEN})
        assert forged.status_code == 403 and "CSRF" in forged.text
        nonce = re.search(r'name="nonce" value="([^"]+)"', c.get("/review/login").text).group(1)  # type: ignore[union-attr]
        signed = c.post("/review/login", data={"nonce": nonce, "who": "Bo", "token": TOKEN, "next": "/review/health"})
        assert signed.status_code == 303 and signed.headers["location"] == "/review/health"
        cookie = next(h for h in signed.headers.get_list("set-cookie") if h.startswith("tagger_review="))
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/review" in cookie.lower()
        assert c.get("/review/health").status_code == 200
        assert c.get("/review/queue").headers["X-Frame-Options"] == "DENY"


def test_without_a_token_only_this_machine_may_review(server_settings: Settings, url: str) -> None:
    with make_client(server_settings, url, client=("127.0.0.1", 40000), review_token=None) as local:
        local.headers["Host"] = "127.0.0.1:8080"
        assert sign_in(local, "Local", token=None)
        assert local.get("/review/queue").status_code == 200
        rebound = local.get("/review/queue", headers={"Host": "evil.example:8080"})
        assert rebound.status_code == 403 and "TAGGER_REVIEW_TOKEN" in rebound.text
        proxied = local.get("/review/queue", headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 403
    with make_client(server_settings, url, client=("192.0.2.10", 40000), review_token=None) as remote:
        refused = remote.get("/review/login")
        assert refused.status_code == 403 and "only on this machine" in refused.text


def test_posts_need_the_sessions_csrf_token(client: TestClient, csrf: str, url: str,
                                            server_settings: Settings) -> None:
    sku, attribute, _ = undecided(url)[0]
    before, tags_before = decisions(url), item(url, sku, attribute)
    missing = decide(client, None, sku=sku, attribute=attribute, action="approve")
    assert missing.status_code == 403 and "CSRF" in missing.json()["detail"]
    assert decide(client, "0" * 43, sku=sku, attribute=attribute, action="approve").status_code == 403
    with make_client(server_settings, url) as other:
        foreign = sign_in(other, "Mallory")  # a valid token, but of another session
    assert decide(client, foreign, sku=sku, attribute=attribute, action="approve").status_code == 403
    assert decisions(url) == before and item(url, sku, attribute) == tags_before


def test_read_only_mode_shows_pages_and_refuses_decisions(server_settings: Settings, url: str) -> None:
    sku, attribute, value = undecided(url)[0]
    before = decisions(url)
    with make_client(server_settings, url, review_read_only=True) as c:
        csrf = sign_in(c, "Ana")
        page = c.get("/review/queue")
        assert "Read-only" in page.text and 'class="approve"' not in page.text
        refused = decide(c, csrf, sku=sku, attribute=attribute, action="approve")
        assert refused.status_code == 403 and "TAGGER_REVIEW_READ_ONLY" in refused.json()["detail"]
    assert decisions(url) == before and item(url, sku, attribute)[value][1] == "machine"


@pytest.mark.parametrize("fields, status, message", [
    ({"sku": "NO-SUCH-SKU", "attribute": "colour", "action": "approve"}, 404, "does not exist"),
    ({"attribute": "shoe_size", "action": "approve"}, 404, "not in the current taxonomies"),
    ({"attribute": "colour", "action": "pick", "value": "teal"}, 422, "is not a label of colour"),
    ({"attribute": "category", "action": "pick", "value": "apparel"}, 422, "parent label"),
    ({"attribute": "colour", "action": "explode"}, 422, "action 'explode' is unknown"),
    ({"attribute": "colour", "action": "pick"}, 422, "pick needs the label"),
])
def test_bad_decisions_get_a_clear_4xx_and_write_nothing(client: TestClient, csrf: str, url: str,
                                                         fields: dict[str, str], status: int, message: str) -> None:
    sku = undecided(url, "accepted", "colour")[0][0]
    before = decisions(url)
    answer = decide(client, csrf, **{"sku": sku, **fields})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    assert decisions(url) == before
    html = client.post("/review/decide", data={"csrf": csrf, "sku": sku, **fields})
    assert html.status_code == status and message in html.text.replace("&#39;", "'")


def test_queue_filters_refuse_unknown_values(client: TestClient, csrf: str) -> None:
    answer = client.get("/review/queue?attribute=colour&label=teal")
    assert answer.status_code == 422 and "is not a label of colour" in answer.text


# ---- decisions -------------------------------------------------------------------------------------------


def test_approve_pick_and_reject_become_manual_tags_with_who_and_when(client: TestClient, csrf: str,
                                                                     url: str) -> None:
    (sku1, attr1, top1), (sku2, attr2, top2), (sku3, attr3, top3) = undecided(url, "accepted")[:3]
    answer = decide(client, csrf, sku=sku1, attribute=attr1, action="approve", next="/review/queue")
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "approved" and 'data-state="approved"' in answer.json()["html"]
    status, source, who, when, _, _ = item(url, sku1, attr1)[top1]
    assert (status, source, who) == ("approved", "manual", "Ana") and when is not None
    logged = decisions(url)
    assert decide(client, csrf, sku=sku1, attribute=attr1, action="approve").json()["changed"] is False
    assert decisions(url) == logged  # approving the approved again records nothing

    other = next(k for k in (lab.key for lab in TAXONOMIES.attribute(attr2).scored_labels) if k != top2)
    assert decide(client, csrf, sku=sku2, attribute=attr2, action="pick", value=other).status_code == 200
    tags = item(url, sku2, attr2)
    assert tags[other][:3] == ("approved", "manual", "Ana") and tags[top2][:2] == ("rejected", "manual")

    form = client.post("/review/decide", data={"csrf": csrf, "sku": sku3, "attribute": attr3, "action": "reject",
                                               "next": "https://evil.example/"})
    assert form.status_code == 303 and form.headers["location"] == "/review/queue"  # never an open redirect
    assert item(url, sku3, attr3)[top3][:2] == ("rejected", "manual")
    log = query_rows(url, "SELECT action, machine_value, chosen_value, decided_by FROM review_decisions "
                          "WHERE sku IN (:a, :b, :c) ORDER BY id", a=sku1, b=sku2, c=sku3)
    assert [tuple(r) for r in log] == [("approve", top1, top1, "Ana"), ("pick", top2, other, "Ana"),
                                       ("reject", top3, None, "Ana")]
    catalog = {r[0] for r in query_rows(url, "SELECT value FROM catalog_tags WHERE sku = :s AND attribute = :a",
                                        s=sku2, a=attr2)}
    assert catalog == {other}


def test_bulk_approve_takes_exactly_the_filtered_set(client: TestClient, csrf: str, url: str) -> None:
    pending = undecided(url, "needs_review")
    attribute = max({a for _, a, _ in pending}, key=lambda a: sum(1 for _, x, _ in pending if x == a))
    selected = [p for p in pending if p[1] == attribute]
    outside = [p for p in pending if p[1] != attribute]
    page = client.get(f"/review/queue?attribute={attribute}&show=pending")
    shown = int(re.search(r'name="expected" value="(\d+)"', page.text).group(1))  # type: ignore[union-attr]
    assert shown == len(selected)
    fields = {"csrf": csrf, "attribute": attribute, "show": "pending"}
    stale = client.post("/review/bulk-approve", data={**fields, "expected": str(shown + 1)},
                        headers={"Accept": "application/json"})
    assert stale.status_code == 409 and "reload" in stale.json()["detail"]
    assert len(undecided(url, "needs_review", attribute)) == len(selected)  # nothing half-applied
    done = client.post("/review/bulk-approve", data={**fields, "expected": str(shown)},
                       headers={"Accept": "application/json"})
    assert done.json() == {"approved": len(selected)}
    for sku, attr, value in selected:
        assert item(url, sku, attr)[value][:3] == ("approved", "manual", "Ana")
    assert undecided(url, "needs_review") == outside
    assert query_value(url, "SELECT count(*) FROM review_decisions WHERE bulk") == len(selected)


def test_queue_lists_products_with_pending_tags_first(client: TestClient, csrf: str, url: str) -> None:
    page = client.get("/review/queue?show=undecided")
    skus = re.findall(r'<article class="card" data-sku="([^"]+)"', page.text)
    pending = {s for s, _, _ in undecided(url, "needs_review")}
    assert skus and (not pending or skus[0] in pending)
    if pending:
        first_non_pending = next((i for i, s in enumerate(skus) if s not in pending), len(skus))
        assert all(s not in pending for s in skus[first_non_pending:])


# ---- duplicates ------------------------------------------------------------------------------------------


def test_a_different_verdict_is_respected_by_the_matcher(client: TestClient, csrf: str,
                                                         catalog: tuple[str, Pipeline, list[dict[str, Any]]]) -> None:
    url, pipeline, events = catalog
    pairs = query_rows(url, "SELECT sku_a, sku_b FROM duplicate_matches ORDER BY similarity DESC")
    assert len(pairs) >= 2, "the seeded copies should be found as near-duplicates"
    (diff_a, diff_b), (same_a, same_b) = pairs[0], pairs[1]
    page = client.get("/review/duplicates")
    assert diff_a in page.text and "similarity" in page.text
    answer = client.post("/review/duplicates/verdict", data={"csrf": csrf, "sku_a": diff_b, "sku_b": diff_a,
                                                              "verdict": "different"},
                         headers={"Accept": "application/json"})
    assert answer.status_code == 200 and answer.json()["verdict"] == "different"
    client.post("/review/duplicates/verdict", data={"csrf": csrf, "sku_a": same_a, "sku_b": same_b,
                                                     "verdict": "same"})
    assert query_rows(url, "SELECT sku_a, sku_b, verdict, decided_by FROM duplicate_verdicts ORDER BY verdict") == [
        (diff_a, diff_b, "different", "Ana"), (same_a, same_b, "same", "Ana")]
    by_sku = {e["sku"]: e for e in events}
    for sku in (diff_a, diff_b, same_a):
        assert pipeline.handle(updated(by_sku[sku], title=by_sku[sku]["title"] + " (new season)")).status == "processed"
    stored = {tuple(r) for r in query_rows(url, "SELECT sku_a, sku_b FROM duplicate_matches")}
    assert (diff_a, diff_b) not in stored and (same_a, same_b) in stored
    unknown = client.post("/review/duplicates/verdict", data={"csrf": csrf, "sku_a": diff_a, "sku_b": "NO-SUCH",
                                                               "verdict": "same"}, headers={"Accept": "application/json"})
    assert unknown.status_code == 404
    nonsense = client.post("/review/duplicates/verdict", data={"csrf": csrf, "sku_a": diff_a, "sku_b": diff_a,
                                                                "verdict": "same"}, headers={"Accept": "application/json"})
    assert nonsense.status_code == 422 and "two different SKUs" in nonsense.json()["detail"]


# ---- heat maps -------------------------------------------------------------------------------------------


def test_heat_map_is_computed_once_then_served_from_the_cache(client: TestClient, csrf: str, url: str) -> None:
    sku, attribute, label = undecided(url, "accepted", "colour")[0]
    query = f"/review/heatmap.png?sku={sku}&attribute={attribute}&label={label}"
    first = client.get(query)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png" and first.headers["X-Tagger-Cache"] == "miss"
    overlay = Image.open(io.BytesIO(first.content))
    image_ref = query_value(url, "SELECT image_ref FROM products WHERE sku = :s", s=sku)
    assert overlay.format == "PNG" and overlay.size == Image.open(image_ref).size
    assert 0 < float(first.headers["X-Tagger-Base-Score"]) <= 1
    started = time.monotonic()
    second = client.get(query)
    assert second.headers["X-Tagger-Cache"] == "hit" and second.content == first.content
    assert time.monotonic() - started < 1.0
    assert query_value(url, "SELECT count(*) FROM review_heatmaps WHERE sku = :s", s=sku) == 1
    why = client.get(f"/review/why?sku={sku}&attribute={attribute}&label={label}")
    assert why.status_code == 200 and "heatmap.png?" in why.text
    bad = client.get(f"/review/heatmap.png?sku={sku}&attribute={attribute}&label=teal")
    assert bad.status_code == 422 and "not a label" in bad.json()["detail"]


# ---- health ----------------------------------------------------------------------------------------------


def test_health_page_shows_the_states_and_agreement(client: TestClient, csrf: str, url: str) -> None:
    page = client.get("/review/health")
    assert page.status_code == 200 and page.text.count("<svg") >= 3
    expected = {tuple(r) for r in query_rows(url, """
        SELECT attribute, count(*) FILTER (WHERE state = 'approved') FROM (
            SELECT sku, attribute, bool_or(status = 'approved') AND true AS approved,
                   CASE WHEN bool_or(status = 'approved') THEN 'approved' ELSE 'other' END AS state
            FROM tags GROUP BY sku, attribute) s GROUP BY attribute""")}
    for attribute, approved in expected:
        row = re.search(rf'<tr data-attribute="{attribute}">(.*?)</tr>', page.text, re.S).group(1)  # type: ignore[union-attr]
        cells = re.findall(r"<td>([^<]*)</td>", row)
        assert cells[4].startswith(f"{approved} (")
    agreed, decided = query_rows(url, "SELECT count(*) FILTER (WHERE action = 'approve' AND chosen_value = "
                                      "machine_value), count(*) FROM review_decisions WHERE NOT bulk")[0]
    assert f"{agreed} of {decided}" in page.text


# ---- machine re-tagging never overwrites a person ------------------------------------------------------


def test_decisions_survive_re_processing_and_taxonomy_apply(client: TestClient, csrf: str, tmp_path: Path,
                                                           catalog: tuple[str, Pipeline, list[dict[str, Any]]]) -> None:
    url, pipeline, events = catalog
    manual_sql = ("SELECT sku, attribute, value, status, score, rank, decided_by, decided_at, updated_at FROM tags "
                  "WHERE source = 'manual' ORDER BY 1, 2, 3")
    before = query_rows(url, manual_sql)
    assert len(before) >= 4
    decided = sorted({r[0] for r in before})
    by_sku = {e["sku"]: e for e in events}
    for sku in decided:  # new text: re-embedded and re-tagged by the per-event path
        assert pipeline.handle(updated(by_sku[sku], description="Re-worded " + (by_sku[sku].get("description") or ""))
                               ).status == "processed"
    assert query_rows(url, manual_sql) == before

    # The bulk path: a taxonomy edit that re-scores every colour and pattern tag from the stored embeddings.
    directory = tmp_path / "taxonomies"
    shutil.copytree(REPO_ROOT / "taxonomies", directory)
    path = directory / "attributes.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("threshold: 0.35", "threshold: 0.95", 1)
                    .replace("{name: Black, synonyms: [charcoal black, jet black]",
                             "{name: Black, synonyms: [charcoal black, jet black, pitch black]", 1), encoding="utf-8")
    settings = pipeline.settings.with_overrides(taxonomy_dir=directory)
    result = retag.apply_taxonomies(get_engine(url), load_taxonomies(directory), encoder=pipeline.encoder,
                                    settings=settings)
    assert result.rows_written > 0, result.summary()
    assert query_rows(url, manual_sql) == before
    assert query_value(url, "SELECT count(*) FROM tags WHERE source = 'machine' AND status IN ('approved', "
                            "'rejected')") == 0
