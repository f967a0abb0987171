"""Every read and write of the service, as visible SQL. Writes are upserts keyed by what identifies them,
so a redelivered event rewrites nothing: rows change only when their values do.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, text

from tagger.duplicates import DuplicatePair
from tagger.scoring import LabelPrototypes, TagDecision
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
    features: np.ndarray | None = None  # backbone image features (exemplar scoring); None before revision 0004


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


def get_products(conn: Connection, skus: Sequence[str]) -> dict[str, StoredProduct]:
    rows = conn.execute(text("SELECT sku, image_hash, text_hash, last_event_at FROM products WHERE sku = ANY(:skus)"),
                        {"skus": list(skus)}).all()
    return {row[0]: StoredProduct(*row) for row in rows}


def lock_sku(conn: Connection, sku: str) -> None:
    """Serialise work on one SKU across workers for the rest of the transaction."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:sku, 0))"), {"sku": sku})


def lock_skus(conn: Connection, skus: Sequence[str]) -> None:
    """``lock_sku`` for many SKUs in one statement, always in SKU order (two batches never deadlock on them)."""
    conn.execute(text("SELECT count(pg_advisory_xact_lock(hashtextextended(s, 0))) "
                      "FROM (SELECT DISTINCT s FROM unnest(CAST(:skus AS text[])) AS s ORDER BY s) AS ordered"),
                 {"skus": list(skus)})


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
        text("SELECT image_hash, text_hash, image_embedding, text_embedding, image_features FROM embeddings "
             "WHERE sku = :sku AND model_id = :model_id"),
        {"sku": sku, "model_id": model_id},
    ).first()
    if row is None:
        return None
    return StoredEmbedding(row[0], row[1], _array(row[2]), None if row[3] is None else _array(row[3]),
                           None if row[4] is None else _array(row[4]))


def get_embeddings(conn: Connection, skus: Sequence[str], model_id: str) -> dict[str, StoredEmbedding]:
    rows = conn.execute(
        text("SELECT sku, image_hash, text_hash, image_embedding, text_embedding, image_features FROM embeddings "
             "WHERE sku = ANY(:skus) AND model_id = :model_id"),
        {"skus": list(skus), "model_id": model_id},
    ).all()
    return {row[0]: StoredEmbedding(row[1], row[2], _array(row[3]), None if row[4] is None else _array(row[4]),
                                    None if row[5] is None else _array(row[5])) for row in rows}


def upsert_embedding(conn: Connection, *, sku: str, model_id: str, image: np.ndarray, text_vector: np.ndarray | None,
                     image_hash: str, text_hash: str, features: np.ndarray | None = None) -> None:
    # Rows written before features were kept get them the next time the product is encoded.
    conn.execute(
        text(
            """
            INSERT INTO embeddings AS e (sku, model_id, image_embedding, text_embedding, image_hash, text_hash,
                                         image_features)
            VALUES (:sku, :model_id, :image, :text, :image_hash, :text_hash, CAST(:features AS halfvec))
            ON CONFLICT (sku, model_id) DO UPDATE SET
                image_embedding = EXCLUDED.image_embedding, text_embedding = EXCLUDED.text_embedding,
                image_hash = EXCLUDED.image_hash, text_hash = EXCLUDED.text_hash,
                image_features = COALESCE(EXCLUDED.image_features, e.image_features), updated_at = now()
            WHERE (e.image_hash, e.text_hash) IS DISTINCT FROM (EXCLUDED.image_hash, EXCLUDED.text_hash)
               OR (e.image_features IS NULL AND EXCLUDED.image_features IS NOT NULL)
            """
        ),
        {"sku": sku, "model_id": model_id, "image": image, "text": text_vector, "image_hash": image_hash,
         "text_hash": text_hash, "features": None if features is None else np.asarray(features, dtype=np.float32)},
    )


# How a machine tag lands on an existing row: never over a person's tag (manual, approved, rejected), and
# only when a value changed, so a repeated event or apply rewrites nothing. Used by the per-event and bulk paths.
MACHINE_TAG_CONFLICT = """
    ON CONFLICT (sku, attribute, value) DO UPDATE SET
        taxonomy = EXCLUDED.taxonomy, score = EXCLUDED.score, rank = EXCLUDED.rank, path = EXCLUDED.path,
        model_id = EXCLUDED.model_id, taxonomy_version = EXCLUDED.taxonomy_version,
        status = EXCLUDED.status, exemplars = EXCLUDED.exemplars, updated_at = now()
    WHERE t.source = 'machine' AND t.status NOT IN ('approved', 'rejected')
      AND (t.taxonomy, t.score, t.rank, t.path, t.model_id, t.taxonomy_version, t.status, t.exemplars)
          IS DISTINCT FROM
          (EXCLUDED.taxonomy, EXCLUDED.score, EXCLUDED.rank, EXCLUDED.path, EXCLUDED.model_id,
           EXCLUDED.taxonomy_version, EXCLUDED.status, EXCLUDED.exemplars)
"""


def upsert_machine_tags(conn: Connection, sku: str, decisions: Sequence[TagDecision], *, model_id: str,
                        versions: dict[str, str], attributes: Sequence[str]) -> None:
    """Make the machine tags of ``attributes`` for ``sku`` exactly ``decisions``.

    Manual tags and tags a person approved or rejected are never touched: a machine decision on the
    same value is dropped, and stale machine rows are deleted only where the source is the machine.
    """
    rows = [
        {"sku": sku, "taxonomy": d.taxonomy, "attribute": d.attribute, "value": d.value, "score": round(d.score, 6),
         "rank": d.rank, "path": d.path, "model_id": model_id, "taxonomy_version": versions[d.taxonomy],
         "status": d.status, "exemplars": d.exemplars}
        for d in decisions
    ]
    if rows:
        conn.execute(
            text(
                """
                INSERT INTO tags AS t (sku, taxonomy, attribute, value, score, rank, path, model_id, taxonomy_version,
                                       source, status, exemplars)
                VALUES (:sku, :taxonomy, :attribute, :value, :score, :rank, :path, :model_id, :taxonomy_version,
                        'machine', :status, :exemplars)
                """ + MACHINE_TAG_CONFLICT
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


def use_iterative_scans(conn: Connection) -> None:
    """For the rest of the transaction: HNSW scans keep going when a filter (model_id) discards candidates
    (pgvector >= 0.8), so filtered nearest-neighbour queries still return k rows; and a wider candidate list than
    pgvector's default 40, which at a million products misses a near-duplicate in about 1 lookup of 8
    (bench/README.md: 200 finds 96% at about 2 ms)."""
    conn.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    conn.execute(text("SET LOCAL hnsw.ef_search = 200"))


def nearest_images(conn: Connection, sku: str, model_id: str, vector: np.ndarray, k: int, *,
                   set_scan: bool = True) -> list[tuple[str, float]]:
    """The k products whose image embeddings are nearest by cosine, through the HNSW index (``set_scan=False``
    when the transaction already called ``use_iterative_scans``)."""
    if set_scan:
        use_iterative_scans(conn)
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
    """Make the stored pairs involving ``sku`` exactly ``pairs`` (one row per pair, sku_a < sku_b), less the pairs
    a person marked "different" on the review page (``duplicate_verdicts``): those are never stored again."""
    different = {r[0] for r in conn.execute(
        text("SELECT CASE WHEN sku_a = :sku THEN sku_b ELSE sku_a END FROM duplicate_verdicts "
             "WHERE verdict = 'different' AND (sku_a = :sku OR sku_b = :sku)"), {"sku": sku})}
    pairs = [p for p in pairs if p.other(sku) not in different]
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
        # NUL bytes and lone surrogates cannot be stored in jsonb nor hashed as UTF-8: make them visible instead.
        value = value.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
        return value if len(value) <= limit else value[:limit] + f"…[{len(value) - limit} more characters]"
    if isinstance(value, dict):
        return {str(_bounded(k, 200)): _bounded(v, limit) for k, v in list(value.items())[:200]}
    if isinstance(value, (list, tuple)):
        return [_bounded(v, limit) for v in list(value)[:200]]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # jsonb has no NaN or Infinity
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


def resolve_failures(conn: Connection, sku: str | Sequence[str]) -> None:
    """Products that now processed cleanly close their open failures."""
    skus = [sku] if isinstance(sku, str) else list(sku)
    conn.execute(text("UPDATE failures SET resolved_at = now() WHERE sku = ANY(:skus) AND resolved_at IS NULL"),
                 {"skus": skus})


def store_taxonomy(conn: Connection, taxonomy: Taxonomy) -> None:
    conn.execute(
        text("INSERT INTO taxonomy_versions (taxonomy, version, content) VALUES (:t, :v, CAST(:c AS jsonb)) "
             "ON CONFLICT DO NOTHING"),
        {"t": taxonomy.name, "v": taxonomy.version, "c": json.dumps(taxonomy.to_json(), ensure_ascii=False)},
    )


def store_prototypes(conn: Connection, model_id: str, taxonomy: Taxonomy,
                     prototypes: Mapping[str, LabelPrototypes]) -> None:
    """Record a taxonomy version and its label embeddings (with the prompt texts each one averages)."""
    store_taxonomy(conn, taxonomy)
    rows = [
        (attribute.name, key, vector, attribute.label(key).prompt_texts(attribute.templates))
        for attribute in taxonomy.attributes
        for key, vector in zip(prototypes[attribute.name].keys, prototypes[attribute.name].vectors, strict=True)
    ]
    store_label_embeddings(conn, model_id, taxonomy.name, taxonomy.version, rows)


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


# ---- taxonomy apply (``tagger taxonomy diff|apply|history``, ``tagger.retag``) ------------------------------------

APPLY_LOCK = "tagger.taxonomy.apply"
RETAG_COLUMNS = ("sku", "taxonomy", "attribute", "value", "score", "rank", "path", "model_id", "taxonomy_version",
                 "status", "exemplars")


def applied_taxonomy_versions(conn: Connection) -> dict[str, str]:
    """The version of each taxonomy that ``tagger taxonomy apply`` last applied."""
    return {r[0]: r[1] for r in conn.execute(text("SELECT taxonomy, version FROM taxonomy_state"))}


def tagged_taxonomy_versions(conn: Connection) -> dict[str, str]:
    """For a database never applied to: the stored version most machine tags of each taxonomy carry."""
    rows = conn.execute(text(
        """
        SELECT DISTINCT ON (t.taxonomy) t.taxonomy, t.taxonomy_version
        FROM tags t JOIN taxonomy_versions v ON v.taxonomy = t.taxonomy AND v.version = t.taxonomy_version
        WHERE t.source = 'machine'
        GROUP BY t.taxonomy, t.taxonomy_version
        ORDER BY t.taxonomy, count(*) DESC, max(v.created_at) DESC
        """
    )).all()
    return {r[0]: r[1] for r in rows}


def load_taxonomy_content(conn: Connection, taxonomy: str, version: str) -> dict[str, Any] | None:
    row = conn.execute(text("SELECT content FROM taxonomy_versions WHERE taxonomy = :t AND version = :v"),
                       {"t": taxonomy, "v": version}).first()
    return None if row is None else (row[0] if isinstance(row[0], dict) else json.loads(row[0]))


def mark_taxonomies_applied(conn: Connection, versions: dict[str, str], removed: Sequence[str] = ()) -> None:
    """Record ``versions`` as the applied ones (the versions must be stored already)."""
    for taxonomy, version in versions.items():
        conn.execute(text(
            """
            INSERT INTO taxonomy_state AS s (taxonomy, version) VALUES (:t, :v)
            ON CONFLICT (taxonomy) DO UPDATE SET version = EXCLUDED.version, applied_at = now()
            WHERE s.version IS DISTINCT FROM EXCLUDED.version
            """), {"t": taxonomy, "v": version})
        conn.execute(text("UPDATE taxonomy_versions SET applied_at = now() WHERE taxonomy = :t AND version = :v "
                          "AND applied_at IS NULL"), {"t": taxonomy, "v": version})
    if removed:
        conn.execute(text("DELETE FROM taxonomy_state WHERE taxonomy = ANY(:r)"), {"r": list(removed)})


def record_taxonomy_apply(conn: Connection, *, from_versions: dict[str, str], to_versions: dict[str, str],
                          model_id: str | None, plan: dict[str, list[str]], changes: list[dict[str, Any]],
                          products: int, rows_written: int, rows_deleted: int, seconds: float) -> None:
    conn.execute(text(
        """
        INSERT INTO taxonomy_applies (from_versions, to_versions, model_id, plan, changes, products, rows_written,
                                      rows_deleted, seconds)
        VALUES (CAST(:f AS jsonb), CAST(:t AS jsonb), :m, CAST(:p AS jsonb), CAST(:c AS jsonb), :products, :w, :d, :s)
        """), {"f": json.dumps(from_versions), "t": json.dumps(to_versions), "m": model_id, "p": json.dumps(plan),
               "c": json.dumps(changes, ensure_ascii=False), "products": products, "w": rows_written,
               "d": rows_deleted, "s": seconds})


def taxonomy_history(conn: Connection, taxonomy: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Stored versions, newest first, with when each was applied and whether it is the applied one."""
    rows = conn.execute(text(
        """
        SELECT v.taxonomy, v.version, v.created_at, v.applied_at, s.version IS NOT NULL AS current,
               (SELECT count(*) FROM tags t WHERE t.taxonomy = v.taxonomy AND t.taxonomy_version = v.version) AS tags
        FROM taxonomy_versions v
        LEFT JOIN taxonomy_state s ON s.taxonomy = v.taxonomy AND s.version = v.version
        WHERE CAST(:t AS text) IS NULL OR v.taxonomy = :t
        ORDER BY v.taxonomy, coalesce(v.applied_at, v.created_at) DESC
        LIMIT :limit
        """), {"t": taxonomy, "limit": limit}).mappings().all()
    return [dict(r) for r in rows]


def taxonomy_applies(conn: Connection, limit: int = 20) -> list[dict[str, Any]]:
    rows = conn.execute(text("SELECT * FROM taxonomy_applies ORDER BY id DESC LIMIT :l"), {"l": limit}).mappings()
    return [dict(r) for r in rows]


def tag_counts(conn: Connection, attributes: Sequence[str]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Products with any tag of each attribute, and products with each (attribute, value) tag."""
    if not attributes:
        return {}, {}
    rows = conn.execute(text(
        """
        SELECT attribute, value, count(DISTINCT sku) FROM tags WHERE attribute = ANY(:a)
        GROUP BY GROUPING SETS ((attribute), (attribute, value))
        """), {"a": list(attributes)}).all()
    per_attribute = {r[0]: int(r[2]) for r in rows if r[1] is None}
    per_value = {(r[0], r[1]): int(r[2]) for r in rows if r[1] is not None}
    return per_attribute, per_value


def embedding_count(conn: Connection, model_id: str | None = None) -> int:
    if model_id is None:
        return int(conn.execute(text("SELECT count(DISTINCT sku) FROM embeddings")).scalar() or 0)
    return int(conn.execute(text("SELECT count(*) FROM embeddings WHERE model_id = :m"), {"m": model_id}).scalar() or 0)


def reusable_label_embeddings(conn: Connection, model_id: str, attributes: Sequence[str]
                              ) -> dict[tuple[str, str, tuple[str, ...]], np.ndarray]:
    """Every stored label embedding of these attributes for this model, keyed by (attribute, label, prompt texts):
    a label whose prompt texts did not change reuses its vector instead of being encoded again."""
    rows = conn.execute(text(
        "SELECT attribute, label, prompts, embedding FROM label_embeddings WHERE model_id = :m AND attribute = ANY(:a) "
        "ORDER BY created_at"), {"m": model_id, "a": list(attributes)}).all()
    result: dict[tuple[str, str, tuple[str, ...]], np.ndarray] = {}
    for attribute, label, prompts, embedding in rows:
        texts = tuple(prompts if isinstance(prompts, list) else json.loads(prompts))
        result[(attribute, label, texts)] = _array(embedding)
    return result


def _raw(conn: Connection) -> Any:
    """The psycopg connection under a SQLAlchemy connection (same transaction), for COPY and binary fetches."""
    return conn.connection.dbapi_connection


def _vector_oid(raw: Any, type_name: str = "vector") -> int:
    """The OID of pgvector's ``vector`` (or ``halfvec``) type, looked up once per connection."""
    attribute = f"_tagger_{type_name}_oid"
    oid = getattr(raw, attribute, None)
    if oid is None:
        with raw.cursor() as cur:
            oid = int(cur.execute("SELECT CAST(%s AS regtype)::oid", (type_name,)).fetchone()[0])
        setattr(raw, attribute, oid)
    return oid


def _raw_vector_loader() -> type:
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    class RawVectorLoader(Loader):
        format = Format.BINARY

        def load(self, data: Any) -> bytes:
            return bytes(data)

    return RawVectorLoader


def _matrix(blobs: Sequence[bytes]) -> np.ndarray:
    """pgvector's binary form (int16 dim, int16 unused, dim big-endian float32) of many rows as one (n, dim) array."""
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    dim = int.from_bytes(blobs[0][:2], "big")
    flat = np.frombuffer(b"".join(blobs), dtype=">f4").reshape(len(blobs), dim + 1)
    return flat[:, 1:].astype(np.float32)


def embeddings_page(conn: Connection, model_id: str, *, after: str | None, limit: int, with_text: bool
                    ) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One page of stored embeddings in SKU order after ``after`` (keyset pagination over the primary key),
    fetched in binary and decoded in one NumPy call. Returns SKUs, image vectors, text vectors (zeros where the
    product has none) and a mask of the products that have a text vector (``None`` unless ``with_text``)."""
    raw = _raw(conn)
    columns = "sku, image_embedding" + (", text_embedding" if with_text else "")
    with raw.cursor(binary=True) as cur:
        cur.adapters.register_loader(_vector_oid(raw), _raw_vector_loader())
        cur.execute(f"SELECT {columns} FROM embeddings WHERE model_id = %s AND (%s::text IS NULL OR sku > %s) "
                    "ORDER BY sku LIMIT %s", (model_id, after, after, limit))
        rows = cur.fetchall()
    skus = [r[0] for r in rows]
    images = _matrix([r[1] for r in rows])
    if not with_text or not rows:
        return skus, images, None, None
    has_text = np.array([r[2] is not None for r in rows], dtype=bool)
    texts = np.zeros_like(images)
    if has_text.any():
        texts[has_text] = _matrix([r[2] for r in rows if r[2] is not None])
    return skus, images, texts, has_text


def machine_tags_page(conn: Connection, attributes: Sequence[str], *, after: str | None, limit: int
                      ) -> tuple[list[tuple[Any, ...]], str | None]:
    """Machine tags of ``attributes`` that a machine may still change, for the SKUs after ``after``: about
    ``limit`` rows, always whole SKUs. Rows: (sku, taxonomy, attribute, value, score, rank, path, model_id, exemplars);
    also returns the last SKU covered (the next page starts after it), ``None`` when there is nothing left."""
    bound = conn.execute(text(
        "SELECT max(sku) FROM (SELECT sku FROM tags WHERE attribute = ANY(:a) AND source = 'machine' "
        "AND (CAST(:after AS text) IS NULL OR sku > :after) ORDER BY sku LIMIT :n) s"),
        {"a": list(attributes), "after": after, "n": limit}).scalar()
    if bound is None:
        return [], None
    return [tuple(r) for r in conn.execute(text(
        """
        SELECT sku, taxonomy, attribute, value, score, rank, path, model_id, exemplars FROM tags
        WHERE attribute = ANY(:a) AND source = 'machine' AND status NOT IN ('approved', 'rejected')
          AND (CAST(:after AS text) IS NULL OR sku > :after) AND sku <= :bound
        ORDER BY sku, attribute, rank
        """), {"a": list(attributes), "after": after, "bound": bound}).all()], bound


def write_machine_tags_bulk(conn: Connection, rows: Sequence[tuple[Any, ...]], skus: Sequence[str],
                            attributes: Sequence[str], *, delete_missing: bool = True) -> tuple[int, int]:
    """``upsert_machine_tags`` for many products at once: make the machine tags of ``attributes`` for ``skus``
    exactly ``rows`` (tuples in ``RETAG_COLUMNS`` order). COPY into a temporary table, then one INSERT ... ON
    CONFLICT and one DELETE. Same rules: manual tags and approved/rejected ones are never touched, a machine
    row is rewritten only when a value changed. Returns (rows inserted or updated, rows deleted)."""
    raw = _raw(conn)
    with raw.cursor() as cur:
        # A lost chunk (crash before the WAL is flushed) is redone by the next apply: no need to wait for fsync.
        cur.execute("SET LOCAL synchronous_commit = off")
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS retag_rows (sku text, taxonomy text, attribute text, value text, "
                    "score real, rank smallint, path text, model_id text, taxonomy_version text, status text, "
                    "exemplars integer) ON COMMIT DELETE ROWS")
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS retag_skus (sku text PRIMARY KEY) ON COMMIT DELETE ROWS")
        cur.execute("TRUNCATE retag_rows, retag_skus")
        with cur.copy(f"COPY retag_rows ({', '.join(RETAG_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        with cur.copy("COPY retag_skus (sku) FROM STDIN") as copy:
            for sku in skus:
                copy.write_row((sku,))
        cur.execute("ANALYZE retag_skus")
        cur.execute(
            """
            INSERT INTO tags AS t (sku, taxonomy, attribute, value, score, rank, path, model_id, taxonomy_version,
                                   source, status, exemplars)
            SELECT sku, taxonomy, attribute, value, score, rank, path, model_id, taxonomy_version, 'machine', status,
                   exemplars
            FROM retag_rows
            """ + MACHINE_TAG_CONFLICT
        )
        written = max(cur.rowcount, 0)
        deleted = 0
        if delete_missing:
            cur.execute(
                """
                DELETE FROM tags t USING retag_skus s
                WHERE t.sku = s.sku AND t.attribute = ANY(%s) AND t.source = 'machine'
                  AND t.status NOT IN ('approved', 'rejected')
                  AND NOT EXISTS (SELECT 1 FROM retag_rows n
                                  WHERE n.sku = t.sku AND n.attribute = t.attribute AND n.value = t.value)
                """,
                (list(attributes),),
            )
            deleted = max(cur.rowcount, 0)
    return written, deleted


def delete_machine_tags(conn: Connection, attributes: Sequence[str]) -> int:
    """Machine tags of removed attributes (manual, approved and rejected ones stay)."""
    if not attributes:
        return 0
    return conn.execute(text("DELETE FROM tags WHERE attribute = ANY(:a) AND source = 'machine' "
                             "AND status NOT IN ('approved', 'rejected')"), {"a": list(attributes)}).rowcount


def try_apply_lock(conn: Connection) -> bool:
    """One taxonomy apply at a time per database (session-level advisory lock on ``conn``)."""
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:k, 0))"), {"k": APPLY_LOCK}).scalar())


def release_apply_lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"), {"k": APPLY_LOCK})
