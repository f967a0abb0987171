"""The pipeline in-process (tiny CLIP, real Postgres): ordering, manual tags, settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from tagger.db.engine import get_engine
from tagger.errors import ConfigurationError
from tagger.events import new_event
from tagger.pipeline import DELETED, FAILED, PROCESSED, STALE, UNCHANGED, Pipeline
from tagger.settings import ENV_NAMES, Settings
from tests.conftest import CATALOG, pipeline_settings

IMAGE = str(CATALOG.parent / "images" / "2227.jpg")
OTHER_IMAGE = str(CATALOG.parent / "images" / "2246.jpg")


@pytest.fixture
def pipeline(clean_db: str, image_dir: Path, tiny_clip_dir: Path) -> Pipeline:
    return Pipeline(pipeline_settings(clean_db, image_dir, model=str(tiny_clip_dir)))


def scalar(p: Pipeline, sql: str, **params: object) -> object:
    with get_engine(str(p.settings.database_url)).connect() as conn:
        return conn.execute(text(sql), params).scalar()


def at(minutes: int) -> str:
    return (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)).isoformat()


def test_older_events_never_overwrite_newer_results(pipeline: Pipeline) -> None:
    assert pipeline.handle(new_event("product.created", sku="S1", title="new title", image=IMAGE,
                                     occurred_at=at(10))).status == PROCESSED
    old = pipeline.handle(new_event("product.updated", sku="S1", title="old title", image=OTHER_IMAGE, occurred_at=at(5)))
    assert old.status == STALE
    assert scalar(pipeline, "SELECT title FROM products WHERE sku = 'S1'") == "new title"
    assert pipeline.handle(new_event("product.deleted", sku="S1", occurred_at=at(1))).status == STALE
    assert scalar(pipeline, "SELECT count(*) FROM products WHERE sku = 'S1'") == 1
    assert pipeline.handle(new_event("product.deleted", sku="S1", occurred_at=at(20))).status == DELETED
    assert pipeline.handle(new_event("product.deleted", sku="S1", occurred_at=at(20))).status == UNCHANGED


def test_manual_tags_survive_machine_retagging(pipeline: Pipeline) -> None:
    pipeline.handle(new_event("product.created", sku="M1", title="shirt", image=IMAGE))
    with get_engine(str(pipeline.settings.database_url)).connect() as conn:
        present = {r[0] for r in conn.execute(text("SELECT value FROM tags WHERE sku = 'M1' AND attribute = 'colour'"))}
    manual_value = next(v for v in ("red", "blue", "green", "black", "white") if v not in present)
    with get_engine(str(pipeline.settings.database_url)).begin() as conn:
        conn.execute(text("INSERT INTO tags (sku, taxonomy, attribute, value, score, rank, source, status) "
                          "VALUES ('M1', 'attributes', 'colour', :v, 1, 1, 'manual', 'approved')"), {"v": manual_value})
        conn.execute(text("UPDATE tags SET status = 'approved' WHERE sku = 'M1' AND attribute = 'style' AND rank = 1"))
    approved_style = scalar(pipeline, "SELECT value FROM tags WHERE sku = 'M1' AND attribute = 'style' AND "
                                      "status = 'approved'")
    # A new image re-tags the product; the manual and approved rows must stay as they are.
    pipeline.handle(new_event("product.updated", sku="M1", title="shirt", image=OTHER_IMAGE))
    assert scalar(pipeline, "SELECT source || '/' || status FROM tags WHERE sku = 'M1' AND attribute = 'colour' "
                            "AND value = :v", v=manual_value) == "manual/approved"
    assert scalar(pipeline, "SELECT count(*) FROM tags WHERE sku = 'M1' AND attribute = 'style' AND value = :v "
                            "AND status = 'approved'", v=approved_style) == 1
    # Machine suggestions remain beside the manual tag for review.
    assert scalar(pipeline, "SELECT count(*) FROM tags WHERE sku = 'M1' AND attribute = 'colour' "
                            "AND source = 'machine'") >= 1


def test_sql_metacharacters_and_unicode_in_sku_are_stored_verbatim(pipeline: Pipeline) -> None:
    sku = "x'; DROP TABLE products;-- ☃"
    assert pipeline.handle(new_event("product.created", sku=sku, title="robe d'été", image=IMAGE)).status == PROCESSED
    assert scalar(pipeline, "SELECT title FROM products WHERE sku = :s", s=sku) == "robe d'été"


def test_permanent_failures_are_recorded_with_sku_and_stage(pipeline: Pipeline) -> None:
    outcome = pipeline.handle(new_event("product.created", sku="F1", image="/etc/passwd"))
    assert outcome.status == FAILED and "outside the configured image roots" in outcome.detail
    assert scalar(pipeline, "SELECT stage || ':' || error_class FROM failures WHERE sku = 'F1'") == "image:ImageNotAllowed"
    big = {"type": "product.created", "sku": "F2", "title": "x" * 10_000_000, "image": IMAGE}
    assert pipeline.handle(big).status == FAILED
    stored = scalar(pipeline, "SELECT length(payload->>'title') FROM failures WHERE sku = 'F2'")
    assert stored is not None and stored < 5_000  # the payload is kept, bounded


def test_settings_from_environment() -> None:
    settings = Settings.from_env({"TAGGER_REVIEW_THRESHOLD": "0.7", "TAGGER_IMAGE_ROOTS": "/a:/b",
                                  "TAGGER_ALLOW_PRIVATE_URLS": "yes", "TAGGER_TOP_K": "5"})
    assert settings.review_threshold == 0.7 and settings.top_k == 5 and settings.allow_private_urls is True
    assert settings.image_roots == (Path("/a"), Path("/b"))
    assert settings.database_url is None  # embedded default
    for bad in ({"TAGGER_REVIEW_THRESHOLD": "1.5"}, {"TAGGER_TOP_K": "many"}, {"TAGGER_DEVICE": "tpu"},
                {"TAGGER_ALLOW_PRIVATE_URLS": "maybe"}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            Settings.from_env(bad)
    assert "TAGGER_DATABASE_URL" in ENV_NAMES and "TAGGER_BROKER_URL" in ENV_NAMES


def test_label_embeddings_are_cached_per_model_and_taxonomy_version(pipeline: Pipeline) -> None:
    pipeline.handle(new_event("product.created", sku="L1", title="shirt", image=IMAGE))
    versions = pipeline.taxonomies().versions
    assert scalar(pipeline, "SELECT count(DISTINCT taxonomy_version) FROM label_embeddings") == len(versions)
    labels = sum(len(a.scored_labels) for a in pipeline.taxonomies().attributes)
    assert scalar(pipeline, "SELECT count(*) FROM label_embeddings WHERE model_id = :m",
                  m=pipeline.encoder.model_id) == labels
    # A second pipeline (another worker process) reads them instead of encoding the prompts again.
    other = Pipeline(pipeline.settings, encoder=pipeline.encoder)
    calls: list[int] = []
    original = pipeline.encoder.encode_texts
    pipeline.encoder.encode_texts = lambda texts, batch_size=64: calls.append(len(texts)) or original(texts)  # type: ignore[method-assign]
    try:
        other.prototypes()
    finally:
        pipeline.encoder.encode_texts = original  # type: ignore[method-assign]
    assert calls == []


def test_json_logs_carry_sku_and_event_id() -> None:
    import json
    import logging

    from tagger.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("tagger.pipeline", logging.WARNING, __file__, 1, "event failed: %s", ("boom",), None)
    record.sku, record.event_id = "SKU-1", "evt-1"
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "event failed: boom" and payload["sku"] == "SKU-1" and payload["event_id"] == "evt-1"
    assert "sku=SKU-1 event_id=evt-1" in TextFormatter("%(message)s").format(record)
    with pytest.raises(ConfigurationError, match="TAGGER_LOG_FORMAT"):
        Settings.from_env({"TAGGER_LOG_FORMAT": "xml"})


def test_fuzzed_event_payloads_are_processed_or_recorded_never_crash(pipeline: Pipeline) -> None:
    """Random payloads (random keys, random types in every contract field, hostile strings): handle() never raises,
    and every payload either stores its product or leaves a failures row."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
                        st.sampled_from(["", "\x00", "../../etc/passwd", "http://127.0.0.1/x.jpg", IMAGE,
                                         "x'; DROP TABLE products;--", "\ud800"]))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                               max_size=3), max_leaves=6)
    field_values = {
        "type": st.one_of(st.sampled_from(["product.created", "product.updated", "product.deleted", "product.x"]), values),
        "sku": st.one_of(st.text(min_size=1, max_size=20), values),
        "title": st.one_of(st.text(max_size=50), values),
        "image": st.one_of(st.sampled_from([IMAGE, OTHER_IMAGE, "/etc/passwd", "missing.jpg"]), values),
        "attributes": st.one_of(st.dictionaries(st.text(max_size=10), scalars, max_size=4), values),
        "occurred_at": st.one_of(st.sampled_from(["2026-01-01T00:00:00Z", "yesterday"]), values),
    }
    valid_sku = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs")), min_size=1, max_size=20)

    def near_valid(sku: str, kind: str, image: str, title: str, broken: tuple[str, object] | None) -> dict:
        event = {"type": kind, "sku": sku, "title": title, "image": image}
        if broken is not None:
            event[broken[0]] = broken[1]
        return event

    near_valid_events = st.builds(
        near_valid, valid_sku, st.sampled_from(["product.created", "product.updated"]),
        st.sampled_from([IMAGE, OTHER_IMAGE]), st.text(max_size=30),
        st.none() | st.tuples(st.sampled_from(sorted(field_values)), values),
    )
    payloads = st.one_of(
        near_valid_events,
        st.fixed_dictionaries({}, optional=field_values),
        st.dictionaries(st.text(max_size=10), values, max_size=5),
        values,
    )
    outcomes: dict[str, int] = {}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payloads)
    def check(payload: object) -> None:
        before = scalar(pipeline, "SELECT coalesce(sum(attempts), 0) FROM failures")
        outcome = pipeline.handle(payload)
        outcomes[outcome.status] = outcomes.get(outcome.status, 0) + 1
        if outcome.status == FAILED:
            assert scalar(pipeline, "SELECT coalesce(sum(attempts), 0) FROM failures") == before + 1
        elif outcome.status in (PROCESSED, UNCHANGED):
            assert scalar(pipeline, "SELECT count(*) FROM products WHERE sku = :s", s=outcome.sku) == 1

    check()
    assert outcomes.get(FAILED, 0) > 0 and outcomes.get(PROCESSED, 0) + outcomes.get(UNCHANGED, 0) > 0, outcomes
