"""The webhook receiver: PIMs POST signed product events; they are recorded in the outbox before the answer.

``POST /events`` takes one event (a JSON object) or a batch (a JSON array). The request must carry
``X-Tagger-Timestamp: <unix seconds>`` and ``X-Tagger-Signature: sha256=<hex>``, the HMAC-SHA256 of
``<timestamp>.<raw body>`` under ``TAGGER_WEBHOOK_SECRET``. A request is all or nothing: every event is
validated against the contract (``tagger.events.parse_event``) and the events are written to the outbox in one
transaction before ``202 Accepted`` is sent, so an accepted event is never lost; the relay delivers it to the
workers. An event id sent again (a PIM retrying) is recorded once. A signed request that is refused leaves a
row in ``failures`` (stage ``validate``) for each bad event, so operators see what the PIM sent.

``GET /healthz`` checks Postgres and the broker; ``GET /metrics`` is the Prometheus text format, computed
from the database so that every process reports the same numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import BackgroundTasks, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import Engine, text
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from tagger import __version__, outbox
from tagger.db import repository as repo
from tagger.db.engine import get_engine
from tagger.errors import InvalidEvent
from tagger.events import (BULK_QUEUE, EVENT_TYPES, QUEUE, ProductEvent, event_id_hint, parse_event, sku_hint,
                           with_identity)
from tagger.settings import Settings, env_name

log = logging.getLogger("tagger.web")

SIGNATURE_HEADER = "X-Tagger-Signature"
TIMESTAMP_HEADER = "X-Tagger-Timestamp"
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_BATCH = 1000
# Bodies up to this many times the limit are still read (not kept) so that a signed oversized request can be
# verified and recorded in failures; larger ones are refused unread.
_READ_FACTOR = 4
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SOURCE = "webhook"
_PREFIX_BYTES = 4096
_SKU_IN_PREFIX = re.compile(rb'"sku"\s*:\s*"((?:[^"\\]|\\.){1,128})"')
_TIMESTAMP = re.compile(r"\d{1,12}")


# ---- response models (for the OpenAPI document) ------------------------------------------------------


class Accepted(BaseModel):
    """The events are recorded in the outbox; the workers will process them."""

    accepted: int = Field(description="number of events in the request")
    ids: list[str] = Field(description="event ids, in request order (assigned where the event had none)")


class EventProblem(BaseModel):
    index: int = Field(description="position of the event in the request (0 for a single event)")
    sku: str | None = Field(default=None, description="the event's SKU, where it had a readable one")
    id: str | None = Field(default=None, description="the event's id, where it had one")
    error: str = Field(description="what is wrong and what to change")


class Problem(BaseModel):
    detail: str = Field(description="what is wrong and what to do")
    errors: list[EventProblem] = Field(default_factory=list, description="one entry per invalid event (422)")


class Health(BaseModel):
    status: str = Field(description="ok or unavailable")
    database: str
    broker: str
    webhook: str


# ---- helpers -------------------------------------------------------------------------------------------


class _Refused(Exception):
    """A request answered with an error status; ``record`` says whether it goes to the failures table."""

    def __init__(self, status: int, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers


def _printable(value: str) -> str:
    """A string that encodes to UTF-8 (lone surrogates become '?')."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _safe_copy(value: Any, depth: int = 0) -> Any:
    """A copy of a decoded payload that Postgres can store as jsonb, for the failures table."""
    if depth > 32:
        return "…[nested too deep]"
    if isinstance(value, str):
        return _printable(value).replace("\x00", "\\0")
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {_safe_copy(str(k), depth + 1): _safe_copy(v, depth + 1) for k, v in list(value.items())[:200]}
    if isinstance(value, list):
        return [_safe_copy(v, depth + 1) for v in value[:200]]
    return value


def _storage_problems(payload: Any) -> list[str]:
    """Problems that pass the contract but could not be stored or keyed: NUL bytes and invalid Unicode in any
    string (Postgres text and jsonb refuse both); the contract itself refuses an empty id."""
    problems: list[str] = []
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack and len(problems) < 5:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                key_path = f"{path}.{key}" if path else str(key)
                stack.append((key_path, key))
                stack.append((key_path, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            where = _printable(path)[:120] or "event"
            if "\x00" in value:
                problems.append(f"{where}: must not contain NUL bytes")
            else:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(f"{where}: is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)")
    return sorted(set(problems))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number or null")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise ValueError(f"the number {literal[:40]} is too large; send at most about 1.8e308")
    return number


def decode_body(body: bytes) -> Any:
    """The JSON value of a request body, or ``InvalidEvent`` saying exactly what is wrong with it."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"the body is not UTF-8 text: byte {exc.start} is invalid") from None
    if not decoded.strip():
        raise InvalidEvent("the body is empty; send one event (a JSON object) or a JSON array of events")
    try:
        return json.loads(decoded, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidEvent("the body is not acceptable JSON: it is nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, huge numbers, integers longer than Python parses
        raise InvalidEvent(f"the body is not acceptable JSON: {exc}") from None


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The value of ``X-Tagger-Signature`` for a body sent at ``timestamp`` (what a PIM must compute)."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii"), hashlib.sha256)
    mac.update(body)
    return "sha256=" + mac.hexdigest()


def _signature_matches(mac: Any, header: str) -> bool:
    expected = ("sha256=" + mac.hexdigest()).encode("ascii")
    # Several signatures may be sent (comma-separated), e.g. while a PIM rotates its secret.
    found = False
    for candidate in header.split(","):
        found |= hmac.compare_digest(expected, candidate.strip().lower().encode("latin-1", "replace"))
    return found


def _problem(exc: _Refused) -> JSONResponse:
    body = {"detail": _printable(exc.detail), "errors": exc.errors}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


class _Relay:
    """Best-effort relay after a commit; passes requested while one runs are coalesced into one more pass."""

    def __init__(self, engine: Engine, sender: Callable[[], outbox.Sender]):
        self._engine = engine
        self._make_sender = sender
        self._sender: outbox.Sender | None = None
        self._lock = threading.Lock()
        self._running = False
        self._pending = False

    def __call__(self) -> None:
        with self._lock:
            if self._running:
                self._pending = True
                return
            self._running = True
        try:
            while True:
                with self._lock:
                    self._pending = False
                try:
                    if self._sender is None:
                        self._sender = self._make_sender()
                    outbox.relay_once(self._engine, self._sender)  # sends only; `tagger relay` re-sends lost ones
                except Exception as exc:  # noqa: BLE001 - recorded in the outbox: `tagger relay` delivers them
                    log.warning("events recorded; immediate relay failed, the relay process will send them: %s", exc)
                    return
                with self._lock:
                    if not self._pending:
                        return
        finally:
            with self._lock:
                self._running = False


# ---- the application -------------------------------------------------------------------------------------

_REQUEST_BODY_DOC: dict[str, Any] = {
    "required": True,
    "description": (
        "One product event (a JSON object) or a batch (a JSON array of 1 to "
        f"{MAX_BATCH} events); at most {MAX_BODY_BYTES} bytes. Sign the raw bytes: the request is refused "
        f"unless `{SIGNATURE_HEADER}` is `sha256=` followed by the hex HMAC-SHA256 of `<timestamp>.<body>`."
    ),
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/ProductEvent"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/ProductEvent"}, "minItems": 1,
                     "maxItems": MAX_BATCH},
                ]
            },
            "examples": {
                "one event": {"value": {
                    "type": "product.created", "sku": "SKU-123", "title": "Men Navy Slim Fit Shirt",
                    "description": "Cotton shirt with a button-down collar", "brand": "Acme",
                    "image": "https://cdn.example.com/sku-123.jpg", "attributes": {"price": 39.9},
                    "occurred_at": "2026-11-23T10:00:00Z", "id": "evt-0001"}},
                "a batch": {"value": [
                    {"type": "product.updated", "sku": "SKU-123", "title": "Men Navy Slim Fit Shirt (new season)",
                     "image": "https://cdn.example.com/sku-123.jpg", "id": "evt-0002"},
                    {"type": "product.deleted", "sku": "SKU-77", "id": "evt-0003"}]},
            },
        }
    },
}


def create_app(settings: Settings, *, sender: Callable[[], outbox.Sender] | None = None,
               relay: bool = True, max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH) -> FastAPI:
    """The ASGI app. ``settings`` must be resolved (database and broker URLs set).

    ``sender`` makes the function that hands events to the broker (default: Celery); ``relay=False`` leaves all
    delivery to ``tagger relay``.
    """
    if not settings.database_url or not settings.broker_url:
        raise ValueError("create_app needs resolved settings (database_url and broker_url set)")
    database_url = str(settings.database_url)
    broker_url = str(settings.broker_url)
    secret = settings.webhook_secret or None
    tolerance = settings.webhook_tolerance_s
    read_limit = max_body_bytes * _READ_FACTOR
    relayer = _Relay(get_engine(database_url), sender or outbox.celery_sender) if relay else None

    app = FastAPI(
        title="tagger",
        version=__version__,
        summary="Catalog auto-tagging: the webhook receiver for PIM product events.",
        description=(
            "PIMs POST product events to `/events`, signed with HMAC-SHA256 under a shared secret "
            f"(`{env_name('webhook_secret')}`). Accepted events are recorded in the transactional outbox before "
            "the answer and then delivered to the tagging workers; nothing accepted is lost. Event types: "
            + ", ".join(f"`{t}`" for t in EVENT_TYPES) + "."
        ),
    )

    def engine() -> Engine:
        return get_engine(database_url)

    # ---- POST /events ----------------------------------------------------------------------------------

    def record_failures(rows: list[dict[str, Any]]) -> None:
        try:
            with engine().begin() as conn:
                for row in rows:
                    repo.record_failure(conn, stage="validate", **row)
        except Exception as exc:  # noqa: BLE001 - the client still gets its answer; the log keeps the problem
            log.error("could not record %d refused webhook event(s) in failures: %s", len(rows), exc)

    def body_failure(error_class: str, message: str, prefix: bytes) -> dict[str, Any]:
        match = _SKU_IN_PREFIX.search(prefix[:_PREFIX_BYTES])
        sku = None
        if match:
            try:
                sku = sku_hint({"sku": json.loads(b'"' + match.group(1) + b'"')})
            except ValueError:
                sku = None
        raw = prefix[:2000].decode("utf-8", "replace")
        return {"payload": {"raw": raw, "received_by": SOURCE}, "sku": _printable(sku) if sku else None,
                "error_class": error_class, "message": message}

    async def read_body(request: Request, ts: str) -> tuple[Any, int, bytes]:
        """(HMAC over the body, its size, the body or its first bytes when over the limit)."""
        assert secret is not None
        mac = hmac.new(secret.encode("utf-8"), f"{ts}.".encode("ascii"), hashlib.sha256)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            if not chunk:
                continue
            size += len(chunk)
            if size > read_limit:
                raise _Refused(413, f"the body is over {read_limit} bytes; the limit is {max_body_bytes} bytes")
            mac.update(chunk)
            if size <= max_body_bytes or sum(len(c) for c in chunks) < _PREFIX_BYTES:
                chunks.append(chunk)
        return mac, size, b"".join(chunks)

    def validate(items: list[Any]) -> tuple[list[ProductEvent], list[dict[str, Any]], list[dict[str, Any]]]:
        parsed: list[ProductEvent] = []
        problems: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for index, payload in enumerate(items):
            try:
                event = parse_event(payload)
                storage = _storage_problems(payload)
                if storage:
                    raise InvalidEvent("event cannot be stored: " + "; ".join(storage))
                parsed.append(with_identity(event))
                continue
            except InvalidEvent as exc:
                message = _printable(str(exc))
            except Exception as exc:  # noqa: BLE001 - a validator bug must not become a 500
                log.exception("unexpected error validating webhook event %d", index)
                message = f"event could not be validated: {type(exc).__name__}: {_printable(str(exc))[:300]}"
            sku = sku_hint(payload)
            event_id = event_id_hint(payload)
            event_id = _printable(event_id) if event_id else None
            problems.append({"index": index, "sku": _printable(sku) if sku else None, "id": event_id, "error": message})
            failures.append({"payload": _safe_copy(payload), "sku": _printable(sku) if sku else None,
                             "error_class": "InvalidEvent", "message": f"webhook: {message}", "event_id": event_id})
        return parsed, problems, failures

    def store(events: list[ProductEvent]) -> list[str]:
        with engine().begin() as conn:
            return outbox.enqueue(conn, events, SOURCE)

    async def receive(request: Request, ts_header: str | None, sig_header: str | None) -> list[str]:
        if secret is None:
            raise _Refused(503, f"webhooks are disabled: no shared secret is configured. Set "
                                f"{env_name('webhook_secret')} on the tagger server and sign requests with it.")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _Refused(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the JSON uncompressed")
        if not ts_header or not sig_header:
            missing = [h for h, v in ((TIMESTAMP_HEADER, ts_header), (SIGNATURE_HEADER, sig_header)) if not v]
            raise _Refused(401, f"unsigned request: missing {' and '.join(missing)}. Send {TIMESTAMP_HEADER}: "
                                f"<unix seconds> and {SIGNATURE_HEADER}: sha256=<hex HMAC-SHA256 of "
                                "'<timestamp>.<raw body>' under the shared secret>")
        ts = ts_header.strip()
        if not _TIMESTAMP.fullmatch(ts):
            raise _Refused(401, f"{TIMESTAMP_HEADER} must be the current time in whole unix seconds")
        skew = int(ts) - time.time()
        if abs(skew) > tolerance:
            raise _Refused(401, f"stale request: {TIMESTAMP_HEADER} is {abs(skew):.0f}s "
                                f"{'in the future' if skew > 0 else 'old'}; the tolerance is {tolerance}s. "
                                "Sign each request (and each retry) with the current time; check the sender's clock")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > read_limit:
            raise _Refused(413, f"the body is {declared} bytes; the limit is {max_body_bytes} bytes. "
                                f"Send at most {max_batch} events per request")
        mac, size, body = await read_body(request, ts)
        if not _signature_matches(mac, sig_header):
            raise _Refused(401, f"wrong signature: {SIGNATURE_HEADER} must be sha256=<hex HMAC-SHA256 of "
                                "'<timestamp>.<raw body>'> under the shared secret; sign the exact bytes you send")

        # Authenticated from here on: every refusal is recorded for operators.
        if size > max_body_bytes:
            message = (f"the body is {size} bytes; the limit is {max_body_bytes} bytes. Send fewer events per "
                       "request, and keep fields within the contract (title 1000 characters, description 20000, "
                       "attributes 64 KB)")
            await run_in_threadpool(record_failures, [body_failure("PayloadTooLarge", "webhook: " + message, body)])
            raise _Refused(413, message)
        try:
            decoded = decode_body(body)
            if isinstance(decoded, dict):
                items = [decoded]
            elif isinstance(decoded, list):
                items = decoded
                if not items:
                    raise InvalidEvent("the batch is empty; send at least one event")
            else:
                raise InvalidEvent(f"the body must be one event (a JSON object) or a JSON array of events, "
                                   f"got {type(decoded).__name__}")
        except InvalidEvent as exc:
            await run_in_threadpool(record_failures, [body_failure("InvalidEvent", f"webhook: {exc}", body)])
            raise _Refused(422, str(exc)) from None
        if len(items) > max_batch:
            message = f"the batch has {len(items)} events; send at most {max_batch} per request"
            await run_in_threadpool(record_failures, [body_failure("PayloadTooLarge", "webhook: " + message, body)])
            raise _Refused(413, message)

        parsed, problems, failures = await run_in_threadpool(validate, items)
        if problems:
            await run_in_threadpool(record_failures, failures)
            noun = "event is" if len(problems) == 1 else "events are"
            raise _Refused(422, f"{len(problems)} of {len(items)} {noun} invalid; nothing was accepted. Fix them "
                                "and send the request again", errors=problems)
        try:
            return await run_in_threadpool(store, parsed)
        except DataError as exc:
            message = f"the database refused the events: {_printable(str(exc.orig or exc)).splitlines()[0][:300]}"
            log.warning("webhook: %s", message)
            await run_in_threadpool(record_failures, [body_failure("InvalidEvent", "webhook: " + message, body)])
            raise _Refused(422, message + "; nothing was accepted") from None
        except SQLAlchemyError as exc:
            log.error("webhook: could not record events: %s", exc)
            raise _Refused(503, "the database is unavailable; nothing was accepted. Send the request again",
                           headers={"Retry-After": "5"}) from None

    problem_responses: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem, "description": "missing or wrong signature, or a stale timestamp; nothing recorded"},
        413: {"model": Problem, "description": f"body over {max_body_bytes} bytes or more than {max_batch} events"},
        415: {"model": Problem, "description": "compressed body (Content-Encoding); send plain JSON"},
        422: {"model": Problem, "description": "invalid JSON or invalid event(s): nothing accepted; each bad event is "
                                               "listed with its index and recorded in the failures table"},
        503: {"model": Problem, "description": "no webhook secret configured, or the database is unavailable "
                                               "(retry later); nothing recorded"},
    }

    @app.post(
        "/events",
        status_code=202,
        response_model=Accepted,
        responses=problem_responses,
        summary="Receive product events (one, or a batch)",
        description=(
            "Verifies the signature, validates every event against the contract and records them in the outbox in "
            "one transaction, then answers 202 with their ids. All or nothing: one invalid event refuses the "
            "request. Sending an event id again is harmless: it is recorded once."
        ),
        openapi_extra={"requestBody": _REQUEST_BODY_DOC},
        tags=["events"],
    )
    async def post_events(
        request: Request,
        background: BackgroundTasks,
        x_tagger_timestamp: Annotated[str | None, Header(
            alias=TIMESTAMP_HEADER, description="the time of sending, in unix seconds; must be within "
                                                f"{env_name('webhook_tolerance_s')} (default 300) of the server's")] = None,
        x_tagger_signature: Annotated[str | None, Header(
            alias=SIGNATURE_HEADER, description="`sha256=` + hex HMAC-SHA256 of `<timestamp>.<raw body>` under "
                                                "the shared secret")] = None,
    ) -> Any:
        try:
            ids = await receive(request, x_tagger_timestamp, x_tagger_signature)
        except _Refused as exc:
            if exc.status in (401, 503):
                client = request.client.host if request.client else "?"
                log.warning("webhook from %s refused (%d): %s", client, exc.status, exc.detail)
            return _problem(exc)
        if relayer is not None:
            background.add_task(relayer)
        return {"accepted": len(ids), "ids": ids}

    # ---- GET /healthz ------------------------------------------------------------------------------------

    def check_database() -> str:
        try:
            with engine().connect() as conn:
                conn.execute(text("SELECT 1"))
                if conn.execute(text("SELECT to_regclass('outbox')")).scalar() is None:
                    return "error: the schema is not migrated; run `tagger migrate`"
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return "error: " + _printable(str(getattr(exc, "orig", None) or exc)).splitlines()[0][:300]

    def check_broker() -> str:
        if not broker_url.startswith(("redis://", "rediss://")):
            return "skipped (not a Redis broker)"
        import redis

        try:
            client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return "error: " + _printable(str(exc))[:300]

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "a part failed"}},
             summary="Postgres and broker reachable?", tags=["operations"])
    def healthz() -> Any:
        database, broker = check_database(), check_broker()
        ok = database == "ok" and not broker.startswith("error")
        body = {"status": "ok" if ok else "unavailable", "database": database, "broker": broker,
                "webhook": "configured" if secret else f"disabled: set {env_name('webhook_secret')}"}
        return JSONResponse(body, status_code=200 if ok else 503)

    # ---- GET /metrics ------------------------------------------------------------------------------------

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"},
                        503: {"content": {"text/plain": {}}, "description": "the database is unavailable"}},
             tags=["operations"])
    def metrics() -> Response:
        try:
            text_body = render_metrics(engine(), outbox.redis_queue_depth(broker_url, QUEUE, BULK_QUEUE))
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable: %s", exc)
            return Response("# tagger metrics unavailable: the database does not answer\n", status_code=503,
                            media_type="text/plain; version=0.0.4; charset=utf-8")
        return Response(text_body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # The merchandisers' review page (/review): for people, so it stays out of the OpenAPI document.
    from tagger.web.review import mount_review

    mount_review(app, settings)

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["ProductEvent"] = ProductEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            # The signature headers are optional in the handler only so that a missing one is answered 401 (not
            # FastAPI's 422); for clients they are required.
            patterns = {TIMESTAMP_HEADER: "^[0-9]{1,12}$", SIGNATURE_HEADER: "^sha256=[0-9a-f]{64}"}
            for parameter in schema["paths"]["/events"]["post"].get("parameters", []):
                if parameter.get("name") in patterns:
                    parameter["required"] = True
                    parameter["schema"] = {"type": "string", "pattern": patterns[parameter["name"]],
                                           "title": parameter["name"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---- metrics ---------------------------------------------------------------------------------------------


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(engine: Engine, queue_depth: Callable[[], int | None]) -> str:
    """The Prometheus text exposition of tagger's counters, all read from the database (one snapshot)."""
    buckets = ", ".join(f"count(*) FILTER (WHERE s <= {b!r})" for b in LATENCY_BUCKETS)
    with engine.connect() as conn:
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        received, unsent = conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE sent_at IS NULL) FROM outbox")).one()
        outcomes = conn.execute(text(
            "SELECT coalesce(outcome, 'unknown'), count(*) FROM outbox WHERE processed_at IS NOT NULL "
            "GROUP BY 1 ORDER BY 1")).all()
        failed = conn.execute(text("SELECT count(*) FROM failures WHERE resolved_at IS NULL")).scalar_one()
        latency = conn.execute(text(
            f"SELECT {buckets}, count(*), coalesce(sum(s), 0) FROM (SELECT extract(epoch FROM processed_at - "
            "received_at)::float8 AS s FROM outbox WHERE processed_at IS NOT NULL) t")).one()
    depth = queue_depth()

    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("tagger_events_received_total", "counter", "Events recorded in the outbox (all sources).")
    lines.append(f"tagger_events_received_total {int(received)}")
    family("tagger_events_processed_total", "counter", "Events the workers finished, by outcome.")
    for outcome, count in outcomes:
        lines.append(f'tagger_events_processed_total{{outcome="{_label(str(outcome))}"}} {int(count)}')
    family("tagger_events_failed_total", "gauge", "Open (unresolved) rows of the failures table.")
    lines.append(f"tagger_events_failed_total {int(failed)}")
    family("tagger_outbox_unsent", "gauge", "Outbox events not yet handed to the broker.")
    lines.append(f"tagger_outbox_unsent {int(unsent)}")
    family("tagger_queue_depth", "gauge",
           f"Messages waiting in the broker queues {QUEUE} and {BULK_QUEUE} (absent if unknown).")
    if depth is not None:
        lines.append(f"tagger_queue_depth {int(depth)}")
    family("tagger_event_latency_seconds", "histogram", "Seconds from receiving an event to finishing it.")
    *cumulative, count, total = latency
    for bound, value in zip(LATENCY_BUCKETS, cumulative, strict=True):
        lines.append(f'tagger_event_latency_seconds_bucket{{le="{_number(float(bound))}"}} {int(value)}')
    lines.append(f'tagger_event_latency_seconds_bucket{{le="+Inf"}} {int(count)}')
    lines.append(f"tagger_event_latency_seconds_sum {_number(float(total))}")
    lines.append(f"tagger_event_latency_seconds_count {int(count)}")
    return "\n".join(lines) + "\n"
