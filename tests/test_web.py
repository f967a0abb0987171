"""The webhook receiver over the real app, real Postgres (and, end to end, a real Redis and worker)."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from tagger import outbox
from tagger.db.engine import get_engine
from tagger.events import EVENT_TYPES, new_event
from tagger.settings import Settings
from tagger.web.app import create_app, signature
from tests.conftest import SAMPLES, query_rows, query_value, wait_until

SECRET = "s3cret-shared-with-the-pim"
GOLDEN = Path(__file__).parent / "golden" / "openapi.json"
METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? '
                         r'(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|NaN|[+-]Inf)$')


# ---- helpers -------------------------------------------------------------------------------------------


q = query_rows
one = query_value


def event(sku: str = "WEB-1", **fields: Any) -> dict[str, Any]:
    fields = {"title": "Men Navy Slim Fit Shirt", "image": "https://cdn.example.com/web-1.jpg", **fields}
    return new_event("product.created", sku=sku, **fields)


def post(client: TestClient, payload: Any = None, *, raw: bytes | None = None, secret: str | None = SECRET,
         ts: int | str | None = None, sig: str | None = None, headers: dict[str, str] | None = None) -> Any:
    body = raw if raw is not None else json.dumps(payload).encode()
    stamp = str(int(time.time()) if ts is None else ts)
    sent = {"Content-Type": "application/json", "X-Tagger-Timestamp": stamp}
    if secret is not None:
        sent["X-Tagger-Signature"] = sig or signature(secret, stamp, body)
    sent.update(headers or {})
    return client.post("/events", content=body, headers={k: v for k, v in sent.items() if v is not None})


class Sent:
    """The broker side of the relay, recorded (the end-to-end test uses the real Celery sender)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def factory(self) -> outbox.Sender:
        return lambda events, queue: self.events.extend(json.loads(e) if isinstance(e, str) else e for e in events)


def app_settings(server_settings: Settings, database_url: str, **overrides: Any) -> Settings:
    return Settings(database_url=database_url, broker_url=server_settings.broker_url, data_dir=server_settings.data_dir,
                    webhook_secret=SECRET).with_overrides(**overrides)


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def client(server_settings: Settings, clean_db: str, sent: Sent) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(server_settings, clean_db), sender=sent.factory)) as c:
        yield c


def counts(url: str) -> tuple[int, int]:
    return one(url, "SELECT count(*) FROM outbox"), one(url, "SELECT count(*) FROM failures")


def failures(url: str) -> list[Any]:
    return q(url, "SELECT sku, stage, error_class, message, event_id FROM failures ORDER BY id")


# ---- accepted ------------------------------------------------------------------------------------------


def test_signed_event_is_recorded_in_the_outbox_then_relayed(client: TestClient, clean_db: str, sent: Sent) -> None:
    ev = event(attributes={"price": 39.9, "colour": "navy"})
    response = post(client, ev)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 1, "ids": [ev["id"]]}
    row = q(clean_db, "SELECT sku, source, event, sent_at FROM outbox WHERE event_id = :i", i=ev["id"])[0]
    assert row[0] == "WEB-1" and row[1] == "webhook"
    assert row[2]["attributes"] == {"price": 39.9, "colour": "navy"} and row[2]["type"] == "product.created"
    # The background relay ran after the commit: the event reached the broker and the row is marked sent.
    assert row[3] is not None
    assert [e["id"] for e in sent.events] == [ev["id"]]


def test_batch_is_recorded_in_one_go_and_ids_are_assigned(client: TestClient, clean_db: str) -> None:
    with_id = event("WEB-A")
    without = {"type": "product.updated", "sku": "WEB-B", "image": "https://cdn.example.com/b.jpg"}
    delete = {"type": "product.deleted", "sku": "WEB-C", "id": "evt-delete-c"}
    response = post(client, [with_id, without, delete])
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert len(ids) == 3 and ids[0] == with_id["id"] and ids[2] == "evt-delete-c" and ids[1]
    rows = q(clean_db, "SELECT event_id, sku, event->>'occurred_at' FROM outbox ORDER BY id")
    assert [(r[0], r[1]) for r in rows] == list(zip(ids, ["WEB-A", "WEB-B", "WEB-C"], strict=True))
    assert all(r[2] for r in rows)  # every recorded event has a time, so per-SKU ordering works


def test_same_event_id_twice_is_recorded_once(client: TestClient, clean_db: str) -> None:
    ev = event("WEB-DUP")
    first, again = post(client, ev), post(client, ev)
    assert first.status_code == again.status_code == 202
    assert first.json()["ids"] == again.json()["ids"] == [ev["id"]]
    assert post(client, [ev, ev]).status_code == 202
    assert one(clean_db, "SELECT count(*) FROM outbox WHERE event_id = :i", i=ev["id"]) == 1
    assert one(clean_db, "SELECT count(*) FROM outbox") == 1


# ---- refused before anything is recorded ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        ("no headers", {"secret": None, "ts": ""}, "missing X-Tagger-Timestamp and X-Tagger-Signature"),
        ("no signature", {"secret": None}, "missing X-Tagger-Signature"),
        ("wrong secret", {"secret": "guessed"}, "wrong signature"),
        ("garbage signature", {"sig": "sha256=zz"}, "wrong signature"),
        ("bare hex", {"sig": "0" * 64}, "wrong signature"),
        ("stale", {"ts": int(time.time()) - 301}, "stale request"),
        ("from the future", {"ts": int(time.time()) + 3600}, "in the future"),
        ("not a number", {"ts": "yesterday"}, "unix seconds"),
    ],
)
def test_unsigned_wrong_or_stale_requests_are_refused_and_record_nothing(
        client: TestClient, clean_db: str, case: str, kwargs: dict[str, Any], expected: str) -> None:
    response = post(client, event(), **kwargs)
    assert response.status_code == 401, (case, response.text)
    assert expected in response.json()["detail"]
    assert counts(clean_db) == (0, 0)  # unauthenticated requests cannot fill the failures table either


def test_signature_over_other_bytes_is_refused(client: TestClient, clean_db: str) -> None:
    stamp = str(int(time.time()))
    signed = json.dumps(event("WEB-1")).encode()
    tampered = signed.replace(b"WEB-1", b"WEB-2")
    response = client.post("/events", content=tampered, headers={"X-Tagger-Timestamp": stamp,
                                                                 "X-Tagger-Signature": signature(SECRET, stamp, signed)})
    assert response.status_code == 401 and counts(clean_db) == (0, 0)
    # The timestamp is signed too: replaying the signature with another time fails.
    response = client.post("/events", content=signed, headers={"X-Tagger-Timestamp": str(int(stamp) - 1),
                                                               "X-Tagger-Signature": signature(SECRET, stamp, signed)})
    assert response.status_code == 401 and counts(clean_db) == (0, 0)


def test_rotating_secrets_may_send_several_signatures(client: TestClient, clean_db: str) -> None:
    body = json.dumps(event()).encode()
    stamp = str(int(time.time()))
    both = f"{signature('old-secret', stamp, body)}, {signature(SECRET, stamp, body)}"
    assert post(client, raw=body, ts=stamp, sig=both).status_code == 202


def test_without_a_secret_webhooks_are_disabled(server_settings: Settings, clean_db: str, sent: Sent) -> None:
    app = create_app(app_settings(server_settings, clean_db, webhook_secret=None), sender=sent.factory)
    with TestClient(app) as c:
        response = post(c, event())
        assert response.status_code == 503
        assert "TAGGER_WEBHOOK_SECRET" in response.json()["detail"]
        assert post(c, event(), secret=None).status_code == 503
        health = c.get("/healthz").json()
    assert counts(clean_db) == (0, 0) and not sent.events
    assert "TAGGER_WEBHOOK_SECRET" in health["webhook"]


def test_compressed_bodies_are_refused(client: TestClient, clean_db: str) -> None:
    response = post(client, event(), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415 and counts(clean_db) == (0, 0)


# ---- refused with a clear message and a failures row ------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "payload", "raw", "expected"),
    [
        ("malformed JSON", None, b'{"type": "product.created", "sku": ', "not valid JSON"),
        ("not UTF-8", None, b'{"sku": "\xff\xfe"}', "not UTF-8"),
        ("empty body", None, b"", "body is empty"),
        ("NaN", None, b'{"type": "product.created", "sku": "N", "image": "a.jpg", "attributes": {"x": NaN}}',
         "NaN is not a JSON number"),
        ("huge number", None, b'{"type": "product.created", "sku": "N", "image": "a.jpg", "attributes": {"x": 1e999}}',
         "too large"),
        ("a number", 42, None, "got int"),
        ("empty batch", [], None, "batch is empty"),
        ("sku of the wrong type", {"type": "product.created", "sku": 123, "image": "a.jpg"}, None, "sku"),
        ("unknown type", {"type": "product.renamed", "sku": "WEB-1"}, None, "unknown event type 'product.renamed'"),
        ("unknown key", {"type": "product.deleted", "sku": "WEB-1", "colour": "red"}, None, "colour"),
        ("no image", {"type": "product.created", "sku": "WEB-1"}, None, "needs an 'image'"),
        ("SKU with NUL", {"type": "product.deleted", "sku": "WEB\x00-1"}, None, "control characters"),
        ("image with NUL", {"type": "product.created", "sku": "WEB-1", "image": "a\x00.jpg"}, None,
         "image: must not contain NUL"),
        ("lone surrogate", None, b'{"type": "product.created", "sku": "WEB-1", "image": "a.jpg", "title": "\\ud800"}',
         "title: Input should be a valid string, unable to parse raw data as a unicode string"),
        ("lone surrogate in attributes", None,
         b'{"type": "product.deleted", "sku": "WEB-1", "attributes": {"note": "\\udc00"}}', "attributes: "),
        ("id with NUL", {"type": "product.deleted", "sku": "WEB-1", "id": "a\x00b"}, None, "id: must not contain NUL"),
        ("empty id", {"type": "product.deleted", "sku": "WEB-1", "id": ""}, None, "id: String should have at least 1 character"),
        ("bad time", {"type": "product.deleted", "sku": "WEB-1", "occurred_at": "last tuesday"}, None,
         "not an ISO 8601 timestamp"),
    ],
)
def test_invalid_requests_get_422_and_a_failures_row(client: TestClient, clean_db: str, sent: Sent, case: str,
                                                     payload: Any, raw: bytes | None, expected: str) -> None:
    response = post(client, payload, raw=raw)
    assert response.status_code == 422, (case, response.text)
    body = response.json()
    assert expected in body["detail"] + json.dumps(body["errors"], ensure_ascii=False), (case, body)
    assert one(clean_db, "SELECT count(*) FROM outbox") == 0 and not sent.events
    rows = failures(clean_db)
    assert len(rows) == 1 and rows[0][1] == "validate" and rows[0][2] == "InvalidEvent", rows
    assert expected in rows[0][3], (case, rows[0][3])


def test_one_bad_event_refuses_the_whole_batch_and_names_it(client: TestClient, clean_db: str) -> None:
    good = event("WEB-GOOD")
    bad = {"type": "product.created", "sku": "WEB-BAD", "image": 7, "id": "evt-bad"}
    worse = {"type": "product.created", "sku": ["x"], "image": "a.jpg"}
    response = post(client, [good, bad, good, worse])
    assert response.status_code == 422
    body = response.json()
    assert "2 of 4 events are invalid; nothing was accepted" in body["detail"]
    assert [(e["index"], e["sku"], e["id"]) for e in body["errors"]] == [(1, "WEB-BAD", "evt-bad"), (3, None, None)]
    assert "image" in body["errors"][0]["error"] and "sku" in body["errors"][1]["error"]
    assert one(clean_db, "SELECT count(*) FROM outbox") == 0
    rows = failures(clean_db)
    assert [(r[0], r[1], r[4]) for r in rows] == [("WEB-BAD", "validate", "evt-bad"), (None, "validate", None)]
    # The PIM retries the same bad batch: the failures are counted, not duplicated.
    assert post(client, [good, bad, good, worse]).status_code == 422
    assert q(clean_db, "SELECT attempts FROM failures ORDER BY id") == [(2,), (2,)]


def test_ten_megabyte_title_is_413_and_recorded(client: TestClient, clean_db: str) -> None:
    response = post(client, event("WEB-HUGE", title="T" * (10 * 1024 * 1024)))
    assert response.status_code == 413
    assert "limit is 5242880 bytes" in response.json()["detail"]
    assert one(clean_db, "SELECT count(*) FROM outbox") == 0
    rows = failures(clean_db)
    assert [(r[0], r[1], r[2]) for r in rows] == [("WEB-HUGE", "validate", "PayloadTooLarge")]
    # A body far over the limit is refused unread (and, unverified, is not recorded).
    assert post(client, raw=b" " * (21 * 1024 * 1024)).status_code == 413
    assert len(failures(clean_db)) == 1


def test_a_title_over_the_contract_limit_is_422(client: TestClient, clean_db: str) -> None:
    response = post(client, event("WEB-LONG", title="T" * 1001))
    assert response.status_code == 422 and "title" in response.json()["errors"][0]["error"]
    assert failures(clean_db)[0][0] == "WEB-LONG"


def test_too_many_events_in_a_batch_is_413(server_settings: Settings, clean_db: str, sent: Sent) -> None:
    app = create_app(app_settings(server_settings, clean_db), sender=sent.factory, max_batch=3)
    with TestClient(app) as c:
        response = post(c, [event(f"WEB-{i}") for i in range(4)])
    assert response.status_code == 413 and "at most 3 per request" in response.json()["detail"]
    assert counts(clean_db) == (0, 1)


# ---- health, metrics, OpenAPI ------------------------------------------------------------------------------


def test_healthz(client: TestClient, server_settings: Settings, clean_db: str, sent: Sent) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok", "webhook": "configured"}
    broken = create_app(app_settings(server_settings, clean_db, broker_url="redis://127.0.0.1:1/0"),
                        sender=sent.factory)
    with TestClient(broken) as c:
        response = c.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"] == "ok" and response.json()["broker"].startswith("error")


def parse_metrics(body: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        assert METRIC_LINE.match(line), f"not a Prometheus sample: {line!r}"
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_parse_and_follow_the_database(client: TestClient, clean_db: str) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    before = parse_metrics(response.text)
    assert before["tagger_events_received_total"] == 0 and before["tagger_events_failed_total"] == 0
    assert before['tagger_event_latency_seconds_bucket{le="+Inf"}'] == 0
    assert "tagger_queue_depth" in before  # the session's Redis answers

    ids = post(client, [event("WEB-M1"), event("WEB-M2")]).json()["ids"]
    post(client, {"type": "product.renamed", "sku": "WEB-M3"})
    with get_engine(clean_db).begin() as conn:  # what a worker does when it finishes an event
        outbox.mark_processed(conn, ids[0], "processed")
    after = parse_metrics(client.get("/metrics").text)
    assert after["tagger_events_received_total"] == 2
    assert after["tagger_outbox_unsent"] == 0  # the background relay sent both
    assert after['tagger_events_processed_total{outcome="processed"}'] == 1
    assert after["tagger_events_failed_total"] == 1
    assert after["tagger_event_latency_seconds_count"] == 1
    assert after['tagger_event_latency_seconds_bucket{le="+Inf"}'] == 1
    assert after['tagger_event_latency_seconds_bucket{le="60.0"}'] == 1
    assert 0 <= after["tagger_event_latency_seconds_sum"] < 60
    buckets = [v for k, v in after.items() if k.startswith("tagger_event_latency_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative


def test_openapi_describes_events_and_matches_the_golden_file(tmp_path: Path) -> None:
    app = create_app(Settings(database_url="postgresql://golden@localhost/none", broker_url="redis://localhost:1/0",
                              data_dir=tmp_path, webhook_secret=SECRET))
    with TestClient(app) as c:
        served = c.get("/openapi.json").json()
    operation = served["paths"]["/events"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/ProductEvent"} in schema["oneOf"]
    product = served["components"]["schemas"]["ProductEvent"]
    assert product["properties"]["type"]["enum"] == list(EVENT_TYPES)
    assert set(product["required"]) == {"type", "sku"} and product["additionalProperties"] is False
    assert {(p["name"], p["in"], p["required"]) for p in operation["parameters"]} == {
        ("X-Tagger-Timestamp", "header", True), ("X-Tagger-Signature", "header", True)}
    assert {"202", "401", "413", "422", "503"} <= set(operation["responses"])
    assert {"/events", "/healthz", "/metrics"} <= set(served["paths"])

    rendered = json.dumps(served, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if os.environ.get("TAGGER_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(rendered, encoding="utf-8")
    assert GOLDEN.exists(), "run with TAGGER_UPDATE_GOLDEN=1 to write tests/golden/openapi.json"
    assert json.loads(GOLDEN.read_text(encoding="utf-8")) == served, (
        "the OpenAPI document changed; review the change and regenerate with "
        "TAGGER_UPDATE_GOLDEN=1 pytest tests/test_web.py -k openapi")


# ---- fuzz ----------------------------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=()), max_size=12)  # any code point, lone surrogates included
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)


_plain = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc")), max_size=20)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes any JSON of any type (any code point, NUL and lone surrogates included)."""
    return st.sampled_from([True] * 6 + [False]).flatmap(lambda ok: valid if ok else _json)


_fields = {
    "type": _field(st.sampled_from(EVENT_TYPES)),
    "sku": _field(st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)),
    "title": _field(_plain),
    "description": _field(_plain),
    "brand": _field(_plain | st.none()),
    "image": _field(st.sampled_from(["https://cdn.example.com/a.jpg", "images/2227.jpg"])),
    "attributes": _field(st.dictionaries(_plain, _json, max_size=3)),
    "occurred_at": _field(st.datetimes().map(lambda d: d.isoformat()) | st.just("2026-11-23T10:00:00Z")),
    "id": _field(st.uuids().map(str)),
}
_event = st.builds(
    lambda contract, extra: {**extra, **contract},
    st.fixed_dictionaries({"type": _fields["type"], "sku": _fields["sku"]},
                          optional={k: v for k, v in _fields.items() if k not in ("type", "sku")}),
    st.one_of(st.just({}), st.just({}), st.dictionaries(_text, _json, max_size=2)),
)
_body = st.one_of(
    _event.map(lambda e: json.dumps(e).encode()),
    _event.map(lambda e: json.dumps(e).encode()),
    st.lists(_event, max_size=3).map(lambda b: json.dumps(b).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
)


def test_fuzzed_payloads_are_accepted_or_refused_never_a_500(server_settings: Settings, clean_db: str) -> None:
    outcome = {"accepted": 0, "refused": 0}
    with TestClient(create_app(app_settings(server_settings, clean_db), relay=False)) as c:

        @hsettings(max_examples=200, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(body=_body)
        def check(body: bytes) -> None:
            before = one(clean_db, "SELECT count(*) FROM outbox")
            response = post(c, raw=body)  # TestClient raises on any unhandled server error
            assert response.status_code == 202 or 400 <= response.status_code < 500, (response.status_code, body)
            if response.status_code == 202:
                outcome["accepted"] += 1
                ids = response.json()["ids"]
                assert ids and one(clean_db, "SELECT count(*) FROM outbox WHERE event_id = ANY(:ids)",
                                   ids=ids) == len(set(ids))
            else:
                outcome["refused"] += 1
                assert response.json()["detail"]
                assert one(clean_db, "SELECT count(*) FROM outbox") == before

        check()
    assert outcome["accepted"] and outcome["refused"], outcome


# ---- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_signed_webhook_event_ends_processed_by_a_real_worker(server_settings: Settings, clean_db: str,
                                                                worker: Any) -> None:
    ev = new_event("product.created", sku="WEB-E2E", title="Puma Men Gypsy Grey Sandal",
                   image=str(SAMPLES / "catalog" / "images" / "2227.jpg"), id=f"web-{uuid.uuid4().hex}")
    with TestClient(create_app(app_settings(server_settings, clean_db))) as c:  # the real Celery sender
        response = post(c, ev)
    assert response.status_code == 202, response.text
    wait_until(lambda: one(clean_db, "SELECT processed_at FROM outbox WHERE event_id = :i", i=ev["id"]), 90,
               "the outbox row to be processed", worker)
    assert one(clean_db, "SELECT count(*) FROM embeddings WHERE sku = 'WEB-E2E'") == 1
    assert one(clean_db, "SELECT outcome FROM outbox WHERE event_id = :i", i=ev["id"])


def test_serve_options() -> None:
    from tagger.web.serve import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.no_relay) == ("127.0.0.1", 8080, False)
    assert build_parser().parse_args(["--host", "0.0.0.0", "--port", "9000"]).port == 9000
