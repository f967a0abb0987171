"""Every read and write of the service, as visible SQL. Writes are upserts keyed by what identifies them,
so a redelivered event rewrites nothing: rows change only when their values do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, text

from tagger.duplicates import DuplicatePair
from tagger.scoring import TagDecision
from tagger.taxonomy.model import Taxonomy


@dataclass(frozen=True)
class StoredProduct:
    sku: str
    image_hash: str | None
    text_hash: str | None
    last_event_at: datetime | None


@dataclass(frozen=True)
class StoredEmbedding:
    image_hash: str
    text_hash: str
    image: np.ndarray
    text: np.ndarray | None


def _array(value: Any) -> np.ndarray:
    """A pgvector value (``Vector`` with the psycopg adapter, text without it) as float32."""
    if hasattr(value, "to_numpy"):
        return value.to_numpy().astype(np.float32, copy=False)
    if isinstance(value, str):
        return np.asarray(json.loads(value), dtype=np.float32)
    return np.asarray(value, dtype=np.float32)


def get_product(conn: Connection, sku: str, *, lock: bool = False) -> StoredProduct | None:
    sql = "SELECT sku, image_hash, text_hash, last_event_at FROM products WHERE sku = :sku"
    row = conn.execute(text(sql + (" FOR UPDATE" if lock else "")), {"sku": sku}).first()
    return StoredProduct(*row) if row else None


def lock_sku(conn: Connection, sku: str) -> None:
    """Serialise work on one SKU across workers for the rest of the transaction."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:sku, 0))"), {"sku": sku})


def upsert_product(conn: Connection, *, sku: str, title: str, description: str, brand: str | None, image_ref: str,
                   attributes: dict[str, Any], image_hash: str, text_hash: str, occurred_at: datetime | None) -> None:
    content_hash = hashlib.sha256(f"{image_hash}:{text_hash}".encode()).hexdigest()
    conn.execute(
        text(
            """
            INSERT INTO products AS p (sku, title, description, brand, image_ref, attributes, image_hash, text_hash,
                                       content_hash, last_event_at)
            VALUES (:sku, :title, :description, :brand, :image_ref, CAST(:attributes AS jsonb), :image_hash,
                    :text_hash, :content_hash, :occurred_at)
            ON CONFLICT (sku) DO UPDATE SET
                title = EXCLUDED.title, description = EXCLUDED.description, brand = EXCLUDED.brand,
                image_ref = EXCLUDED.image_ref, attributes = EXCLUDED.attributes, image_hash = EXCLUDED.image_hash,
                text_hash = EXCLUDED.text_hash, content_hash = EXCLUDED.content_hash,
                last_event_at = GREATEST(p.last_event_at, EXCLUDED.last_event_at), updated_at = now()
            WHERE (p.title, p.description, p.brand, p.image_ref, p.attributes, p.content_hash, p.last_event_at)
                  IS DISTINCT FROM
                  (EXCLUDED.title, EXCLUDED.description, EXCLUDED.brand, EXCLUDED.image_ref, EXCLUDED.attributes,
                   EXCLUDED.content_hash, GREATEST(p.last_event_at, EXCLUDED.last_event_at))
            """
        ),
        {"sku": sku, "title": title, "description": description, "brand": brand, "image_ref": image_ref,
         "attributes": json.dumps(attributes, ensure_ascii=False), "image_hash": image_hash, "text_hash": text_hash,
         "content_hash": content_hash, "occurred_at": occurred_at},
    )


def get_embedding(conn: Connection, sku: str, model_id: str) -> StoredEmbedding | None:
    row = conn.execute(
        text("SELECT image_hash, text_hash, image_embedding, text_embedding FROM embeddings "
             "WHERE sku = :sku AND model_id = :model_id"),
        {"sku": sku, "model_id": model_id},
    ).first()
    if row is None:
        return None
    return StoredEmbedding(row[0], row[1], _array(row[2]), None if row[3] is None else _array(row[3]))


def upsert_embedding(conn: Connection, *, sku: str, model_id: str, image: np.ndarray, text_vector: np.ndarray | None,
                     image_hash: str, text_hash: str) -> None:
    conn.execute(
        text(
            """
            INSERT INTO embeddings AS e (sku, model_id, image_embedding, text_embedding, image_hash, text_hash)
            VALUES (:sku, :model_id, :image, :text, :image_hash, :text_hash)
            ON CONFLICT (sku, model_id) DO UPDATE SET
                image_embedding = EXCLUDED.image_embedding, text_embedding = EXCLUDED.text_embedding,
                image_hash = EXCLUDED.image_hash, text_hash = EXCLUDED.text_hash, updated_at = now()
            WHERE (e.image_hash, e.text_hash) IS DISTINCT FROM (EXCLUDED.image_hash, EXCLUDED.text_hash)
            """
        ),
        {"sku": sku, "model_id": model_id, "image": image, "text": text_vector, "image_hash": image_hash,
         "text_hash": text_hash},
    )


def upsert_machine_tags(conn: Connection, sku: str, decisions: Sequence[TagDecision], *, model_id: str,
                        versions: dict[str, str], attributes: Sequence[str]) -> None:
    """Make the machine tags of ``attributes`` for ``sku`` exactly ``decisions``.

    Manual tags and tags a person approved or rejected are never touched: a machine decision on the
    same value is dropped, and stale machine rows are deleted only where the source is the machine.
    """
    rows = [
        {"sku": sku, "taxonomy": d.taxonomy, "attribute": d.attribute, "value": d.value, "score": round(d.score, 6),
         "rank": d.rank, "path": d.path, "model_id": model_id, "taxonomy_version": versions[d.taxonomy],
         "status": d.status}
        for d in decisions
    ]
    if rows:
        conn.execute(
            text(
                """
                INSERT INTO tags AS t (sku, taxonomy, attribute, value, score, rank, path, model_id, taxonomy_version,
                                       source, status)
                VALUES (:sku, :taxonomy, :attribute, :value, :score, :rank, :path, :model_id, :taxonomy_version,
                        'machine', :status)
                ON CONFLICT (sku, attribute, value) DO UPDATE SET
                    taxonomy = EXCLUDED.taxonomy, score = EXCLUDED.score, rank = EXCLUDED.rank, path = EXCLUDED.path,
                    model_id = EXCLUDED.model_id, taxonomy_version = EXCLUDED.taxonomy_version,
                    status = EXCLUDED.status, updated_at = now()
                WHERE t.source = 'machine' AND t.status NOT IN ('approved', 'rejected')
                  AND (t.taxonomy, t.score, t.rank, t.path, t.model_id, t.taxonomy_version, t.status)
                      IS DISTINCT FROM
                      (EXCLUDED.taxonomy, EXCLUDED.score, EXCLUDED.rank, EXCLUDED.path, EXCLUDED.model_id,
                       EXCLUDED.taxonomy_version, EXCLUDED.status)
                """
            ),
            rows,
        )
    keep = [f"{d.attribute}\x1f{d.value}" for d in decisions]
    conn.execute(
        text(
            """
            DELETE FROM tags
            WHERE sku = :sku AND source = 'machine' AND status NOT IN ('approved', 'rejected')
              AND attribute = ANY(:attributes) AND NOT (attribute || chr(31) || value = ANY(:keep))
            """
        ),
        {"sku": sku, "attributes": list(attributes), "keep": keep},
    )


def nearest_images(conn: Connection, sku: str, model_id: str, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The k products whose image embeddings are nearest by cosine, through the HNSW index."""
    # Iterative scans keep returning rows when the model_id filter discards index candidates (pgvector >= 0.8).
    conn.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    rows = conn.execute(
        text(
            """
            SELECT sku, 1 - (image_embedding <=> :vector) AS similarity
            FROM embeddings
            WHERE model_id = :model_id AND sku <> :sku
            ORDER BY image_embedding <=> :vector
            LIMIT :k
            """
        ),
        {"vector": vector, "model_id": model_id, "sku": sku, "k": k},
    ).all()
    return [(r[0], float(r[1])) for r in rows]


def replace_duplicates(conn: Connection, sku: str, model_id: str, pairs: Sequence[DuplicatePair]) -> None:
    """Make the stored pairs involving ``sku`` exactly ``pairs`` (one row per pair, sku_a < sku_b)."""
    if pairs:
        conn.execute(
            text(
                """
                INSERT INTO duplicate_matches AS d (sku_a, sku_b, model_id, similarity)
                VALUES (:sku_a, :sku_b, :model_id, :similarity)
                ON CONFLICT (sku_a, sku_b, model_id) DO UPDATE SET similarity = EXCLUDED.similarity, updated_at = now()
                WHERE abs(d.similarity - EXCLUDED.similarity) > 1e-6
                """
            ),
            [{"sku_a": p.sku_a, "sku_b": p.sku_b, "model_id": model_id, "similarity": round(p.similarity, 6)}
             for p in pairs],
        )
    partners = [p.other(sku) for p in pairs]
    conn.execute(
        text(
            """
            DELETE FROM duplicate_matches
            WHERE model_id = :model_id AND (sku_a = :sku OR sku_b = :sku)
              AND NOT (CASE WHEN sku_a = :sku THEN sku_b ELSE sku_a END = ANY(:partners))
            """
        ),
        {"model_id": model_id, "sku": sku, "partners": partners},
    )


def delete_product(conn: Connection, sku: str) -> bool:
    """Remove a product; embeddings, tags and matches go with it (ON DELETE CASCADE)."""
    return conn.execute(text("DELETE FROM products WHERE sku = :sku"), {"sku": sku}).rowcount > 0


def _bounded(value: Any, limit: int = 2_000) -> Any:
    """A JSON-safe copy of a payload for the failures table: long strings cut, NUL bytes made visible."""
    if isinstance(value, str):
        value = value.replace("\x00", "\\0")
        return value if len(value) <= limit else value[:limit] + f"…[{len(value) - limit} more characters]"
    if isinstance(value, dict):
        return {str(_bounded(k, 200)): _bounded(v, limit) for k, v in list(value.items())[:200]}
    if isinstance(value, (list, tuple)):
        return [_bounded(v, limit) for v in list(value)[:200]]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _bounded(repr(value), limit)


def record_failure(conn: Connection, *, payload: Any, sku: str | None, stage: str, error_class: str, message: str,
                   event_id: str | None = None) -> None:
    """One row per distinct failure; a redelivered bad event bumps ``attempts`` and ``last_seen``."""
    safe_payload = _bounded(payload if isinstance(payload, (dict, list)) else {"raw": payload})
    canonical = json.dumps(safe_payload, sort_keys=True, ensure_ascii=False)
    fingerprint = hashlib.sha256(f"{stage}\x1f{error_class}\x1f{sku}\x1f{canonical}".encode()).hexdigest()
    conn.execute(
        text(
            """
            INSERT INTO failures AS f (fingerprint, event_id, sku, stage, error_class, message, payload)
            VALUES (:fingerprint, :event_id, :sku, :stage, :error_class, :message, CAST(:payload AS jsonb))
            ON CONFLICT (fingerprint) DO UPDATE SET
                attempts = f.attempts + 1, last_seen = now(), message = EXCLUDED.message, resolved_at = NULL
            """
        ),
        {"fingerprint": fingerprint, "event_id": _bounded(event_id, 128) if event_id else None,
         "sku": _bounded(sku, 128) if sku else None, "stage": stage, "error_class": error_class,
         "message": _bounded(message, 4_000), "payload": canonical},
    )


def resolve_failures(conn: Connection, sku: str) -> None:
    """A product that now processed cleanly closes its open failures."""
    conn.execute(text("UPDATE failures SET resolved_at = now() WHERE sku = :sku AND resolved_at IS NULL"), {"sku": sku})


def store_taxonomy(conn: Connection, taxonomy: Taxonomy) -> None:
    conn.execute(
        text("INSERT INTO taxonomy_versions (taxonomy, version, content) VALUES (:t, :v, CAST(:c AS jsonb)) "
             "ON CONFLICT DO NOTHING"),
        {"t": taxonomy.name, "v": taxonomy.version, "c": json.dumps(taxonomy.to_json(), ensure_ascii=False)},
    )


def load_label_embeddings(conn: Connection, model_id: str, taxonomy: str, version: str) -> dict[tuple[str, str], np.ndarray]:
    rows = conn.execute(
        text("SELECT attribute, label, embedding FROM label_embeddings "
             "WHERE model_id = :m AND taxonomy = :t AND taxonomy_version = :v"),
        {"m": model_id, "t": taxonomy, "v": version},
    ).all()
    return {(r[0], r[1]): _array(r[2]) for r in rows}


def store_label_embeddings(conn: Connection, model_id: str, taxonomy: str, version: str,
                           rows: Sequence[tuple[str, str, np.ndarray, list[str]]]) -> None:
    conn.execute(
        text(
            """
            INSERT INTO label_embeddings (model_id, taxonomy, taxonomy_version, attribute, label, embedding, prompts)
            VALUES (:m, :t, :v, :attribute, :label, :embedding, CAST(:prompts AS jsonb))
            ON CONFLICT DO NOTHING
            """
        ),
        [{"m": model_id, "t": taxonomy, "v": version, "attribute": a, "label": label, "embedding": e,
          "prompts": json.dumps(p, ensure_ascii=False)} for a, label, e, p in rows],
    )
