"""The product event contract, strict validation, and publishing events to the workers.

An event is JSON::

    {"type": "product.created" | "product.updated" | "product.deleted",
     "sku": "ABC-123", "title": "...", "description": "...", "brand": "...",
     "image": "https://cdn.example.com/abc.jpg" | "relative/or/absolute/path.jpg",
     "attributes": {...}, "occurred_at": "2026-11-23T10:00:00Z", "id": "optional event id"}

``image`` is required for created/updated; a delete needs only ``type`` and ``sku``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tagger.errors import InvalidEvent

TASK_NAME = "tagger.process_event"  # one event per message: what other languages send, and per-event retries
BATCH_TASK_NAME = "tagger.process_events"  # several events per message: what the relay sends
QUEUE = "tagger.events"  # live changes from the PIM (webhook, trigger, publish)
BULK_QUEUE = "tagger.bulk"  # catalog loads and repairs (ingest, reconcile), kept apart so they never delay live changes
BULK_SOURCES = frozenset({"ingest", "reconcile"})


def queue_for(source: str) -> str:
    """The broker queue of an outbox event by where it came from."""
    return BULK_QUEUE if source in BULK_SOURCES else QUEUE
EVENT_TYPES = ("product.created", "product.updated", "product.deleted")
MAX_ATTRIBUTES_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ProductEvent(BaseModel):
    """A validated product event. Unknown keys are refused so that typos surface at once."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["product.created", "product.updated", "product.deleted"]
    sku: str = Field(min_length=1, max_length=128)
    title: str = Field(default="", max_length=1_000)
    description: str = Field(default="", max_length=20_000)
    brand: str | None = Field(default=None, max_length=200)
    image: str | None = Field(default=None, min_length=1, max_length=4_096)
    attributes: dict[str, Any] = Field(default_factory=dict)
    occurred_at: datetime | None = None
    id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("sku")
    @classmethod
    def _sku_printable(cls, value: str) -> str:
        if value != value.strip() or _CONTROL.search(value):
            raise ValueError("must not contain control characters (NUL, newline, tab) or surrounding spaces")
        return value

    @field_validator("title", "description", "brand", "image", "id")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("attributes")
    @classmethod
    def _attributes_small(cls, value: dict[str, Any]) -> dict[str, Any]:
        encoded = json.dumps(value, ensure_ascii=False)
        if len(encoded.encode()) > MAX_ATTRIBUTES_BYTES:
            raise ValueError(f"is larger than {MAX_ATTRIBUTES_BYTES} bytes as JSON")
        if "\\u0000" in encoded:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _image_for_upserts(self) -> ProductEvent:
        if self.type != "product.deleted" and not self.image:
            raise ValueError(f"{self.type} needs an 'image' (URL or file path)")
        return self

    @property
    def text(self) -> str:
        """The product text that is embedded: title, then description."""
        return ". ".join(part for part in (self.title.strip(), self.description.strip()) if part)

    def to_message(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def parse_event(payload: Any) -> ProductEvent:
    """Validate a decoded JSON payload (or a JSON string/bytes) against the contract.

    Raises ``InvalidEvent`` whose message lists every field problem.
    """
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"event is not UTF-8 text: {exc}") from None
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise InvalidEvent(f"event is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(payload, Mapping):
        raise InvalidEvent(f"event must be a JSON object, got {type(payload).__name__}")
    data = dict(payload)
    if isinstance(data.get("occurred_at"), str):
        # JSON carries timestamps as text; strict mode would refuse them, so parse here with a clear error.
        try:
            data["occurred_at"] = datetime.fromisoformat(data["occurred_at"].replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEvent(f"occurred_at {data['occurred_at'][:60]!r} is not an ISO 8601 timestamp") from None
    if data.get("type") not in EVENT_TYPES and "type" in data:
        raise InvalidEvent(f"unknown event type {str(data.get('type'))[:60]!r}; use one of {', '.join(EVENT_TYPES)}")
    try:
        return ProductEvent.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False)
        )
        raise InvalidEvent(f"event does not follow the contract: {problems}") from None


def sku_hint(payload: Any) -> str | None:
    """The SKU of a payload even when it is invalid, for the failures table (bounded, printable)."""
    sku = payload.get("sku") if isinstance(payload, Mapping) else None
    if isinstance(sku, str) and sku:
        return _CONTROL.sub("?", sku)[:128]
    return None


def event_id_hint(payload: Any) -> str | None:
    """The event id of a payload even when it is invalid (None unless a non-empty string, bounded)."""
    event_id = payload.get("id") if isinstance(payload, Mapping) else None
    return event_id[:128] if isinstance(event_id, str) and event_id else None


def new_event(type: str, sku: str, **fields: Any) -> dict[str, Any]:
    """An event dict with ``id`` and ``occurred_at`` filled in, ready to publish."""
    event: dict[str, Any] = {"type": type, "sku": sku, **fields}
    event.setdefault("id", uuid.uuid4().hex)
    event.setdefault("occurred_at", datetime.now(UTC).isoformat())
    return event


def with_identity(event: ProductEvent) -> ProductEvent:
    """The event with an ``id`` and ``occurred_at`` (the outbox keys on the id; ordering uses the time)."""
    missing: dict[str, Any] = {}
    if event.id is None:
        missing["id"] = uuid.uuid4().hex
    if event.occurred_at is None:
        missing["occurred_at"] = datetime.now(UTC)
    return event.model_copy(update=missing) if missing else event


def publish(events: ProductEvent | Mapping[str, Any] | Iterable[Mapping[str, Any]], *, validate: bool = True,
            source: str = "publish") -> int:
    """Send events to the workers; returns how many were accepted.

    Events are validated (``InvalidEvent`` for the first bad one, nothing recorded), written to the
    outbox in one transaction, then relayed to the broker at once; if the broker is down the relay
    (``tagger relay``) delivers them later. ``validate=False`` skips both validation and the outbox
    and sends raw payloads straight to the broker, for testing how workers treat hostile input.
    """
    batch: list[Mapping[str, Any]]
    if isinstance(events, ProductEvent):
        batch = [events.to_message()]
    elif isinstance(events, Mapping):
        batch = [events]
    else:
        batch = list(events)
    if not validate:
        from tagger.outbox import celery_sender

        celery_sender(batch_size=1)([dict(e) for e in batch], queue_for(source))
        return len(batch)
    parsed = [with_identity(parse_event(e)) for e in batch]
    from tagger import outbox, services
    from tagger.db.engine import get_engine
    from tagger.settings import get_settings

    settings = services.resolve(get_settings())
    engine = get_engine(str(settings.database_url))
    with engine.begin() as conn:
        outbox.enqueue(conn, parsed, source)
    try:
        outbox.relay_once(engine, outbox.celery_sender())  # sends; re-sending lost events is the relay's job
    except Exception as exc:  # noqa: BLE001 - recorded in the outbox: the relay sends them once the broker is back
        import logging

        logging.getLogger("tagger.events").warning("events recorded; broker unavailable, the relay will send them: %s",
                                                   exc)
    return len(parsed)


def read_catalog(path: Path, *, event_type: str = "product.created") -> Iterator[dict[str, Any]]:
    """Events from a catalog file (.jsonl, .json, .csv or .parquet); relative image paths resolve beside it."""
    suffix = path.suffix.lower()
    rows: Iterable[dict[str, Any]]
    if suffix == ".jsonl":
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else [data]
    elif suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise InvalidEvent(f"catalog {path} has an unknown format; use .jsonl, .json, .csv or .parquet")
    known = set(ProductEvent.model_fields)
    for row in rows:
        event = {k: v for k, v in row.items() if k in known and v is not None and v != ""}
        # Columns that are not part of the contract are PIM attributes.
        extra = {k: v for k, v in row.items() if k not in known and v is not None and v != ""}
        attributes = event.get("attributes") or {}
        if isinstance(attributes, str):  # a CSV cell holding JSON
            try:
                attributes = json.loads(attributes)
            except json.JSONDecodeError:
                raise InvalidEvent(f"catalog {path}: the attributes column is not a JSON object: {attributes[:80]!r}") from None
        if extra or attributes:
            if not isinstance(attributes, dict):
                raise InvalidEvent(f"catalog {path}: attributes must be a JSON object")
            event["attributes"] = {**extra, **attributes}
        if "sku" not in event:
            raise InvalidEvent(f"catalog {path}: a row has no sku: {json.dumps(row, default=str)[:200]}")
        image = event.get("image")
        if isinstance(image, str) and "://" not in image and not Path(image).is_absolute():
            event["image"] = str((path.parent / image).resolve())
        yield new_event(event.pop("type", event_type), **event)
