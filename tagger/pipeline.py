"""What happens to one product event: validate, fetch, embed, tag, match, write. The worker task calls this.

Idempotent by construction: embeddings are keyed by (SKU, model id) and recomputed only when the
image bytes or the text changed; tags and matches are upserts that change rows only when values
change; events older than the newest one applied to a SKU are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from tagger import fewshot, scoring
from tagger.db import exemplar_repository as exemplar_repo
from tagger.db import repository as repo
from tagger.db.engine import get_engine
from tagger.duplicates import select_duplicates
from tagger.encoders.base import Encoder, get_encoder
from tagger.errors import DatabaseUnavailable, PermanentError, TaggerError, TransientError
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
        self._exemplars: tuple[tuple[int, int, int], dict[str, fewshot.AttributeExemplars]] | None = None
        self.fewshot_params = fewshot.FewShotParams.from_settings(settings)
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

    def exemplars(self) -> dict[str, fewshot.AttributeExemplars]:
        """The shop's labelled examples with their features, re-read only when one was added or removed."""
        with self.engine.connect() as conn:
            stamp = exemplar_repo.exemplars_stamp(conn)
            cached = self._exemplars
            if cached is not None and cached[0] == stamp:
                return cached[1]
            loaded = exemplar_repo.load_exemplars(conn, self.encoder.model_id) if stamp[0] else {}
        self._exemplars = (stamp, loaded)
        return loaded

    # ---- events ----------------------------------------------------------------------------------

    def handle(self, payload: Any) -> Outcome:
        """Process one event payload. Permanent problems are recorded as failures and returned;
        transient ones (``TransientError``) propagate so that the caller can retry."""
        result = self.handle_batch([payload])[0]
        if isinstance(result, TransientError):
            raise result
        return result

    def handle_batch(self, payloads: Sequence[Any]) -> list[Outcome | TransientError]:
        """Process events together: one forward pass for the changed images, one for the texts, one scoring
        call and one transaction for the writes.

        Each event keeps its own fate: permanent problems are recorded as its failure and returned as a
        ``FAILED`` outcome; transient ones (image host down, deadlock) are returned as the exception so the
        caller retries that event alone. Only a database outage raises (``DatabaseUnavailable``): the batch is
        retried as a whole, which is harmless because every write is idempotent.
        """
        results: list[Outcome | TransientError | None] = [None] * len(payloads)
        events: list[tuple[int, ProductEvent]] = []
        for index, payload in enumerate(payloads):
            try:
                events.append((index, parse_event(payload)))
            except PermanentError as exc:
                self.record_failure(payload, exc)
                results[index] = Outcome(sku_hint(payload), FAILED, str(exc))
        try:
            # A SKU appears at most once per round, so its events apply in arrival order as if one by one.
            for round_ in _rounds(events):
                self._handle_round(round_, payloads, results)
        except OperationalError as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(f"database connection lost: {exc.orig or exc}") from exc
            raise
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _handle_round(self, round_: list[tuple[int, ProductEvent]], payloads: Sequence[Any],
                      results: list[Outcome | TransientError | None]) -> None:
        def fail(index: int, event: ProductEvent, exc: PermanentError) -> None:
            self.record_failure(payloads[index], exc, event)
            results[index] = Outcome(event.sku, FAILED, str(exc))

        upserts: list[_Upsert] = []
        for index, event in round_:
            if event.type == "product.deleted":
                results[index] = self._delete(event)
            else:
                upserts.append(_Upsert(index, event))
        if not upserts:
            return
        model_id = self.encoder.model_id
        skus = [item.event.sku for item in upserts]
        with self.engine.connect() as conn:
            products = repo.get_products(conn, skus)
            embeddings = repo.get_embeddings(conn, skus, model_id)
        for item in upserts:
            if self._is_stale(products.get(item.event.sku), item.event):
                results[item.index] = Outcome(item.event.sku, STALE, "a newer event for this SKU was already applied")
            else:
                item.stored = embeddings.get(item.event.sku)
        live = [item for item in upserts if results[item.index] is None]
        for item, fetched in zip(live, self._fetch_images([item.event for item in live]), strict=True):
            if isinstance(fetched, TransientError):
                results[item.index] = fetched
            elif isinstance(fetched, PermanentError):
                fail(item.index, item.event, fetched)
            else:
                item.prepare(fetched, self.limits)
                if item.error is not None:
                    fail(item.index, item.event, item.error)
        ready = [item for item in live if results[item.index] is None]
        if not ready:
            return
        taxonomies = self.taxonomies()
        prototypes = self.prototypes()
        exemplars = self.exemplars()
        # Encoding (CPU or GPU) and writing (Postgres) overlap: while chunk k is written, chunk k+1 is encoded in
        # a helper thread (ONNX Runtime, torch and psycopg release the GIL). Chunks follow SKU order, which is
        # also the order of the per-SKU locks, so overlapping batches of two workers cannot deadlock.
        ready.sort(key=lambda item: item.event.sku)
        size = max(4, len(ready) // 4)
        chunks = [ready[i : i + size] for i in range(0, len(ready), size)]

        def encode_and_score(chunk: list[_Upsert]) -> list[list[scoring.TagDecision]]:
            self._encode(chunk)
            return self._score(chunk, taxonomies, prototypes, exemplars)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagger-encode") as encoder_thread:
            encoder_thread.submit(self._encode_texts, ready).result()
            upcoming = encoder_thread.submit(encode_and_score, chunks[0])
            for number, chunk in enumerate(chunks):
                decisions = upcoming.result()
                if number + 1 < len(chunks):
                    upcoming = encoder_thread.submit(encode_and_score, chunks[number + 1])
                self._write_isolating_refusals(list(zip(chunk, decisions, strict=True)), taxonomies, model_id,
                                               results, fail)

    def _score(self, items: Sequence[_Upsert], taxonomies: TaxonomySet,
               prototypes: dict[str, scoring.LabelPrototypes],
               exemplars: dict[str, fewshot.AttributeExemplars]) -> list[list[scoring.TagDecision]]:
        texts = [item.text_vector for item in items]
        features = None
        known = [item.features for item in items if item.features is not None]
        if exemplars and known:
            # A product without features (NaN row) is scored zero-shot; the tag records that no exemplar was used.
            features = np.full((len(items), len(known[0])), np.nan, dtype=np.float32)
            for row, item in enumerate(items):
                if item.features is not None and len(item.features) == features.shape[1]:
                    features[row] = item.features
        return scoring.tag_products(
            taxonomies, prototypes, np.stack([item.image_vector for item in items]), self.encoder.logit_scale,
            text_vectors=None if any(t is None for t in texts) else np.stack(texts),
            text_weight=self.settings.text_weight,
            default_threshold=self.settings.review_threshold, default_top_k=self.settings.top_k,
            image_features=features, exemplars=exemplars or None, fewshot_params=self.fewshot_params,
        )

    def _write_isolating_refusals(self, pending: list[tuple[_Upsert, list[scoring.TagDecision]]],
                                  taxonomies: TaxonomySet, model_id: str,
                                  results: list[Outcome | TransientError | None],
                                  fail: Callable[[int, ProductEvent, PermanentError], None]) -> None:
        """``_write`` for a chunk; if Postgres refuses one event's writes, each event is written alone so that
        only that event fails. Write conflicts (deadlock, serialisation) are returned for a retry."""
        try:
            self._write(pending, taxonomies, model_id, results)
            return
        except DBAPIError as exc:
            if exc.connection_invalidated or (isinstance(exc, OperationalError) and not _is_conflict(exc)):
                raise
            if _is_conflict(exc):
                for item, _ in pending:
                    results[item.index] = WriteConflict(f"write conflict with another worker: {exc.orig or exc}")
                return
            if len(pending) == 1:
                item = pending[0][0]
                fail(item.index, item.event, DatabaseRefused(f"the database refused the writes: {exc.orig or exc}"))
                return
        for one in pending:
            self._write_isolating_refusals([one], taxonomies, model_id, results, fail)

    def _fetch_images(self, events: Sequence[ProductEvent]) -> list[bytes | TaggerError]:
        """Image bytes per event (or its error); remote images are fetched concurrently."""
        def fetch(event: ProductEvent) -> bytes | TaggerError:
            assert event.image is not None  # guaranteed by the event contract
            try:
                return read_image_bytes(event.image, self.limits)
            except TaggerError as exc:
                return exc

        if len(events) <= 1:
            return [fetch(event) for event in events]
        with ThreadPoolExecutor(max_workers=min(8, len(events)), thread_name_prefix="tagger-fetch") as pool:
            return list(pool.map(fetch, events))

    def _encode_texts(self, items: Sequence[_Upsert]) -> None:
        """Embed the texts of the changed products in one pass (the text encoder is several times faster per
        text at batch 16 than at 4, unlike the image backbone, so texts are not split into chunks)."""
        changed = [item for item in items if item.changed]
        if changed:
            for item, vector in zip(changed, self.encoder.encode_texts([item.text for item in changed]), strict=True):
                item.text_vector = vector

    def _encode(self, items: Sequence[_Upsert]) -> None:
        """Embed changed products' images in one pass (texts: ``_encode_texts``); reuse stored vectors for the rest."""
        changed = [item for item in items if item.changed]
        if changed:
            images, features = self.encoder.encode_images_with_features([item.image for item in changed])
            for row, item in enumerate(changed):
                item.image_vector, item.features = images[row], features[row]
                item.image = None  # decoded pixels are not needed any more; free them early
        for item in items:
            if not item.changed:
                assert item.stored is not None
                item.image_vector, item.text_vector, item.features = (item.stored.image, item.stored.text,
                                                                      item.stored.features)

    def _write(self, pending: Sequence[tuple[_Upsert, list[scoring.TagDecision]]], taxonomies: TaxonomySet,
               model_id: str, results: list[Outcome | TransientError | None]) -> None:
        """All writes of a batch in one transaction, in SKU order (the per-SKU locks are taken in that order, so
        two workers writing overlapping batches cannot deadlock on them). Results are set only on commit."""
        versions = taxonomies.versions
        attributes = [a.name for a in taxonomies.attributes]
        outcomes: list[tuple[_Upsert, Outcome]] = []
        with self.engine.begin() as conn:
            skus = [item.event.sku for item, _ in pending]
            repo.lock_skus(conn, skus)
            products = repo.get_products(conn, skus)
            repo.use_iterative_scans(conn)
            written: list[str] = []
            for item, decisions in pending:
                event = item.event
                if self._is_stale(products.get(event.sku), event):
                    outcomes.append((item, Outcome(event.sku, STALE, "a newer event for this SKU was applied meanwhile")))
                    continue
                repo.upsert_product(conn, sku=event.sku, title=event.title, description=event.description,
                                    brand=event.brand, image_ref=event.image or "", attributes=event.attributes,
                                    image_hash=item.image_hash, text_hash=item.text_hash,
                                    occurred_at=event.occurred_at)
                repo.upsert_embedding(conn, sku=event.sku, model_id=model_id, image=item.image_vector,
                                      text_vector=item.text_vector, image_hash=item.image_hash,
                                      text_hash=item.text_hash, features=item.features if item.changed else None)
                repo.upsert_machine_tags(conn, event.sku, decisions, model_id=model_id, versions=versions,
                                         attributes=attributes)
                neighbours = repo.nearest_images(conn, event.sku, model_id, item.image_vector,
                                                 self.settings.duplicate_neighbours, set_scan=False)
                pairs = select_duplicates(event.sku, neighbours, self.settings.duplicate_threshold)
                repo.replace_duplicates(conn, event.sku, model_id, pairs)
                written.append(event.sku)
                outcomes.append((item, Outcome(event.sku, PROCESSED if item.changed else UNCHANGED,
                                               f"{len(decisions)} tags, {len(pairs)} duplicates")))
            if written:
                repo.resolve_failures(conn, written)
        for item, outcome in outcomes:
            results[item.index] = outcome

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
        return self.count_deliveries([payload])[0]

    def count_deliveries(self, payloads: Sequence[Any]) -> list[int | None]:
        """Count one more start of each event's processing, in one statement; None for events that did not come
        through the outbox."""
        ids = [event_id_hint(payload) for payload in payloads]
        known = [i for i in ids if i is not None]
        counts: dict[str, int] = {}
        if known:
            with self.engine.begin() as conn:
                counts = dict(conn.execute(
                    text("UPDATE outbox SET deliveries = deliveries + 1 WHERE event_id = ANY(:ids) "
                         "AND processed_at IS NULL RETURNING event_id, deliveries"), {"ids": known}).all())
        return [None if i is None else counts.get(i) for i in ids]

    def mark_delivered(self, payload: Any, outcome: str) -> None:
        """Close the event's outbox row, so the relay does not send it again."""
        self.mark_delivered_many([(payload, outcome)])

    def mark_delivered_many(self, settled: Sequence[tuple[Any, str]]) -> None:
        """Close the outbox rows of settled events (``(payload, outcome)``) in one transaction."""
        from tagger.outbox import mark_processed

        rows = [(event_id_hint(payload), outcome) for payload, outcome in settled]
        rows = [(event_id, outcome) for event_id, outcome in rows if event_id is not None]
        if rows:
            with self.engine.begin() as conn:
                for event_id, outcome in rows:
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


class WriteConflict(TransientError):
    """Another worker's transaction collided with this event's writes (deadlock, serialisation); retried."""

    stage = "database"


class DatabaseRefused(PermanentError):
    """Postgres rejected the event's writes (a constraint or data error); retrying the same event will not help."""

    stage = "database"


def _is_conflict(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")  # deadlock_detected, serialization_failure


def _rounds(events: Sequence[tuple[int, ProductEvent]]) -> list[list[tuple[int, ProductEvent]]]:
    """Split a batch so that each SKU appears at most once per round, keeping arrival order."""
    rounds: list[list[tuple[int, ProductEvent]]] = []
    seen: list[set[str]] = []
    for index, event in events:
        occurrence = 0
        while occurrence < len(seen) and event.sku in seen[occurrence]:
            occurrence += 1
        if occurrence == len(rounds):
            rounds.append([])
            seen.append(set())
        # A later event for a SKU must come after its earlier one: place it after the earlier one's round.
        rounds[occurrence].append((index, event))
        seen[occurrence].add(event.sku)
    return rounds


class _Upsert:
    """One create/update event on its way through a batch."""

    def __init__(self, index: int, event: ProductEvent) -> None:
        self.index = index
        self.event = event
        self.stored: repo.StoredEmbedding | None = None
        self.error: PermanentError | None = None
        self.image: Image.Image | None = None
        self.image_hash = ""
        self.text = ""
        self.text_hash = ""
        self.changed = False
        self.image_vector: np.ndarray = np.zeros(0, dtype=np.float32)
        self.text_vector: np.ndarray | None = None
        self.features: np.ndarray | None = None

    def prepare(self, data: bytes, limits: ImageLimits) -> None:
        """Hash the content; decode the image only if the product must be embedded again."""
        self.image_hash = image_digest(data)
        self.text = self.event.text or self.event.sku
        self.text_hash = hashlib.sha256(self.text.encode()).hexdigest()
        stored = self.stored
        # Rows from before features were kept are re-encoded once, so exemplar scoring can use them.
        self.changed = (stored is None or (stored.image_hash, stored.text_hash) != (self.image_hash, self.text_hash)
                        or stored.features is None)
        if self.changed:
            try:
                self.image = decode_image(data, limits)
            except PermanentError as exc:
                self.error = exc
