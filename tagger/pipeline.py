"""What happens to one product event: validate, fetch, embed, tag, match, write. The worker task calls this.

Idempotent by construction: embeddings are keyed by (SKU, model id) and recomputed only when the
image bytes or the text changed; tags and matches are upserts that change rows only when values
change; events older than the newest one applied to a SKU are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from tagger import scoring
from tagger.db import repository as repo
from tagger.db.engine import get_engine
from tagger.duplicates import select_duplicates
from tagger.encoders.base import Encoder, get_encoder
from tagger.errors import DatabaseUnavailable, PermanentError
from tagger.events import ProductEvent, event_id_hint, parse_event, sku_hint
from tagger.images import ImageLimits, decode_image, image_digest, read_image_bytes
from tagger.settings import Settings
from tagger.taxonomy.loader import load_taxonomies
from tagger.taxonomy.model import TaxonomySet

log = logging.getLogger("tagger.pipeline")

PROCESSED = "processed"
UNCHANGED = "unchanged"
DELETED = "deleted"
STALE = "stale"
FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    sku: str | None
    status: str
    detail: str = ""


class Pipeline:
    """Holds what a worker process loads once: settings, database engine, encoder, taxonomies, label prototypes."""

    def __init__(self, settings: Settings, *, encoder: Encoder | None = None, engine: Engine | None = None):
        if settings.database_url is None:
            raise ValueError("Pipeline needs a resolved database URL (tagger.services.resolve)")
        self.settings = settings
        self.engine = engine or get_engine(settings.database_url)
        self._encoder = encoder
        self.limits = ImageLimits.from_settings(settings)
        self._taxonomy_stamp: tuple[tuple[str, float], ...] | None = None
        self._taxonomies: TaxonomySet | None = None
        self._prototypes: dict[str, scoring.LabelPrototypes] | None = None
        self._lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = get_encoder(self.settings.model, self.settings.device)
        return self._encoder

    # ---- taxonomies and label prototypes -------------------------------------------------------

    def taxonomies(self) -> TaxonomySet:
        """The taxonomy set, re-read when a file in the taxonomy folder changed (edits take effect live)."""
        directory = self.settings.taxonomy_dir
        stamp = tuple(sorted((p.name, p.stat().st_mtime) for p in directory.glob("*.y*ml"))) if directory.is_dir() else ()
        with self._lock:
            if self._taxonomies is None or stamp != self._taxonomy_stamp:
                self._taxonomies = load_taxonomies(directory)
                self._taxonomy_stamp = stamp
                self._prototypes = None
            return self._taxonomies

    def prototypes(self) -> dict[str, scoring.LabelPrototypes]:
        taxonomies = self.taxonomies()
        with self._lock:
            if self._prototypes is None:
                self._prototypes = self._load_or_build_prototypes(taxonomies)
            return self._prototypes

    def _load_or_build_prototypes(self, taxonomies: TaxonomySet) -> dict[str, scoring.LabelPrototypes]:
        """Label embeddings are computed once per (model, taxonomy version) and cached in the database."""
        model_id = self.encoder.model_id
        result: dict[str, scoring.LabelPrototypes] = {}
        with self.engine.begin() as conn:
            missing: list = []
            for taxonomy in taxonomies.taxonomies:
                stored = repo.load_label_embeddings(conn, model_id, taxonomy.name, taxonomy.version)
                for attribute in taxonomy.attributes:
                    keys = tuple(label.key for label in attribute.scored_labels)
                    if all((attribute.name, key) in stored for key in keys):
                        vectors = np.stack([stored[(attribute.name, key)] for key in keys])
                        result[attribute.name] = scoring.LabelPrototypes(attribute.name, keys, vectors)
                    else:
                        missing.append(taxonomy)
                        break
            for taxonomy in missing:
                subset = TaxonomySet((taxonomy,))
                built = scoring.build_prototypes(subset, lambda texts: self.encoder.encode_texts(texts))
                repo.store_prototypes(conn, model_id, taxonomy, built)
                result.update(built)
        return result

    # ---- events ----------------------------------------------------------------------------------

    def handle(self, payload: Any) -> Outcome:
        """Process one event payload. Permanent problems are recorded as failures and returned;
        transient ones (``TransientError``) propagate so that the caller can retry."""
        event: ProductEvent | None = None
        try:
            event = parse_event(payload)
            if event.type == "product.deleted":
                return self._delete(event)
            return self._upsert(event)
        except PermanentError as exc:
            self.record_failure(payload, exc, event)
            return Outcome(event.sku if event else sku_hint(payload), FAILED, str(exc))
        except OperationalError as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(f"database connection lost: {exc.orig or exc}") from exc
            raise

    def record_failure(self, payload: Any, exc: BaseException, event: ProductEvent | None = None) -> None:
        stage = getattr(exc, "stage", "internal")
        sku = event.sku if event else sku_hint(payload)
        event_id = event.id if event else event_id_hint(payload)
        log.warning("event failed at stage %s: %s: %s", stage, type(exc).__name__, exc,
                    extra={"sku": sku, "event_id": event_id, "stage": stage, "error_class": type(exc).__name__})
        with self.engine.begin() as conn:
            repo.record_failure(conn, payload=payload, sku=sku, stage=stage, error_class=type(exc).__name__,
                                message=str(exc), event_id=event_id)

    def count_delivery(self, payload: Any) -> int | None:
        """Count one more start of this event's processing; None for events that did not come through the outbox."""
        event_id = event_id_hint(payload)
        if event_id is None:
            return None
        with self.engine.begin() as conn:
            return conn.execute(text("UPDATE outbox SET deliveries = deliveries + 1 WHERE event_id = :id "
                                     "AND processed_at IS NULL RETURNING deliveries"), {"id": event_id}).scalar()

    def mark_delivered(self, payload: Any, outcome: str) -> None:
        """Close the event's outbox row, so the relay does not send it again."""
        event_id = event_id_hint(payload)
        if event_id is not None:
            from tagger.outbox import mark_processed

            with self.engine.begin() as conn:
                mark_processed(conn, event_id, outcome)

    def _is_stale(self, stored: repo.StoredProduct | None, event: ProductEvent) -> bool:
        return bool(stored and stored.last_event_at and event.occurred_at and event.occurred_at < stored.last_event_at)

    def _delete(self, event: ProductEvent) -> Outcome:
        with self.engine.begin() as conn:
            repo.lock_sku(conn, event.sku)
            stored = repo.get_product(conn, event.sku)
            if self._is_stale(stored, event):
                return Outcome(event.sku, STALE, "a newer event for this SKU was already applied")
            removed = repo.delete_product(conn, event.sku)
            repo.resolve_failures(conn, event.sku)
        # Deleting an unknown SKU is a no-op, so a redelivered delete does no harm.
        return Outcome(event.sku, DELETED if removed else UNCHANGED, "" if removed else "SKU was not stored")

    def _upsert(self, event: ProductEvent) -> Outcome:
        assert event.image is not None  # guaranteed by the event contract
        with self.engine.connect() as conn:
            stored_product = repo.get_product(conn, event.sku)
            if self._is_stale(stored_product, event):
                return Outcome(event.sku, STALE, "a newer event for this SKU was already applied")
            stored = repo.get_embedding(conn, event.sku, self.encoder.model_id)
        data = read_image_bytes(event.image, self.limits)
        image_hash = image_digest(data)
        text = event.text or event.sku
        text_hash = hashlib.sha256(text.encode()).hexdigest()
        changed = stored is None or (stored.image_hash, stored.text_hash) != (image_hash, text_hash)
        if changed:
            image = decode_image(data, self.limits)
            image_vector = self.encoder.encode_images([image])[0]
            text_vector = self.encoder.encode_texts([text])[0]
        else:
            image_vector, text_vector = stored.image, stored.text
        taxonomies = self.taxonomies()
        decisions = scoring.tag_products(
            taxonomies, self.prototypes(), image_vector[None, :], self.encoder.logit_scale,
            text_vectors=None if text_vector is None else text_vector[None, :], text_weight=self.settings.text_weight,
            default_threshold=self.settings.review_threshold, default_top_k=self.settings.top_k,
        )[0]
        model_id = self.encoder.model_id
        with self.engine.begin() as conn:
            repo.lock_sku(conn, event.sku)
            if self._is_stale(repo.get_product(conn, event.sku), event):
                return Outcome(event.sku, STALE, "a newer event for this SKU was applied meanwhile")
            repo.upsert_product(conn, sku=event.sku, title=event.title, description=event.description,
                                brand=event.brand, image_ref=event.image, attributes=event.attributes,
                                image_hash=image_hash, text_hash=text_hash, occurred_at=event.occurred_at)
            repo.upsert_embedding(conn, sku=event.sku, model_id=model_id, image=image_vector, text_vector=text_vector,
                                  image_hash=image_hash, text_hash=text_hash)
            repo.upsert_machine_tags(conn, event.sku, decisions, model_id=model_id, versions=taxonomies.versions,
                                     attributes=[a.name for a in taxonomies.attributes])
            neighbours = repo.nearest_images(conn, event.sku, model_id, image_vector, self.settings.duplicate_neighbours)
            pairs = select_duplicates(event.sku, neighbours, self.settings.duplicate_threshold)
            repo.replace_duplicates(conn, event.sku, model_id, pairs)
            repo.resolve_failures(conn, event.sku)
        return Outcome(event.sku, PROCESSED if changed else UNCHANGED, f"{len(decisions)} tags, {len(pairs)} duplicates")
