"""Every read and write of exemplars (labelled examples for few-shot scoring), as visible SQL.

Exemplar rows hold who vouched for which label of which product; the features scoring needs are read from
``embeddings.image_features`` of the configured model (see migration 0007 for why they are not copied).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, text

from tagger.db.repository import _array, _matrix, _raw, _raw_vector_loader, _vector_oid
from tagger.fewshot import AttributeExemplars

SOURCES = ("review_approval", "review_correction", "import")


@dataclass(frozen=True)
class ExemplarRow:
    sku: str
    taxonomy: str
    attribute: str
    label: str
    source: str
    created_by: str | None
    created_at: datetime
    has_features: bool  # the product has stored backbone features for the model asked about


def halfvec_matrix(blobs: Sequence[bytes]) -> np.ndarray:
    """pgvector's binary ``halfvec`` (int16 dim, int16 unused, dim big-endian float16) of many rows as one
    (n, dim) float32 array. The 4-byte header is exactly two float16 slots, dropped after one reshape."""
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    dim = int.from_bytes(blobs[0][:2], "big")
    flat = np.frombuffer(b"".join(blobs), dtype=">f2").reshape(len(blobs), dim + 2)
    return flat[:, 2:].astype(np.float32)


def _binary_rows(conn: Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` fetched in binary, ``halfvec`` and ``vector`` values left as raw bytes (``halfvec_matrix``,
    ``repository._matrix``)."""
    raw = _raw(conn)
    with raw.cursor(binary=True) as cur:
        cur.adapters.register_loader(_vector_oid(raw, "halfvec"), _raw_vector_loader())
        cur.adapters.register_loader(_vector_oid(raw), _raw_vector_loader())
        cur.execute(sql, params)
        return cur.fetchall()


def add_exemplar(conn: Connection, *, sku: str, attribute: str, label: str, source: str, created_by: str | None,
                 taxonomy: str | None = None) -> bool:
    """Record that ``sku`` is an example of ``label`` for ``attribute``. Idempotent: True only when a row was
    added. ``taxonomy`` defaults to the taxonomy of the product's tags of that attribute."""
    if source not in SOURCES:
        raise ValueError(f"exemplar source {source!r} is not one of {', '.join(SOURCES)}")
    return conn.execute(text(
        """
        INSERT INTO exemplars (sku, taxonomy, attribute, label, source, created_by)
        VALUES (:sku, COALESCE(CAST(:taxonomy AS text),
                               (SELECT taxonomy FROM tags WHERE attribute = :attribute ORDER BY (sku = :sku) DESC
                                LIMIT 1), ''),
                :attribute, :label, :source, :created_by)
        ON CONFLICT (sku, attribute, label) DO NOTHING
        """), {"sku": sku, "taxonomy": taxonomy, "attribute": attribute, "label": label, "source": source,
               "created_by": created_by}).rowcount > 0


def add_exemplars(conn: Connection, rows: Iterable[tuple[str, str, str, str]], *, source: str,
                  created_by: str | None) -> int:
    """Many (sku, taxonomy, attribute, label) exemplars at once; existing ones are left as they are.
    Returns how many were new."""
    if source not in SOURCES:
        raise ValueError(f"exemplar source {source!r} is not one of {', '.join(SOURCES)}")
    params = [{"sku": s, "taxonomy": t, "attribute": a, "label": lab, "source": source, "created_by": created_by}
              for s, t, a, lab in rows]
    if not params:
        return 0
    added = 0
    for row in params:  # a few hundred rows per import: plain statements keep the per-row conflict rule visible
        added += conn.execute(text(
            "INSERT INTO exemplars (sku, taxonomy, attribute, label, source, created_by) "
            "VALUES (:sku, :taxonomy, :attribute, :label, :source, :created_by) "
            "ON CONFLICT (sku, attribute, label) DO NOTHING"), row).rowcount
    return added


def remove_exemplars(conn: Connection, *, sku: str | None = None, attribute: str | None = None,
                     label: str | None = None) -> list[tuple[str, str, str]]:
    """Delete the exemplars matching every given filter (at least a SKU, or an attribute and a label);
    returns the (sku, attribute, label) of each row removed."""
    if sku is None and (attribute is None or label is None):
        raise ValueError("remove exemplars by --sku, or by --attribute together with --label")
    rows = conn.execute(text(
        """
        DELETE FROM exemplars
        WHERE (CAST(:sku AS text) IS NULL OR sku = :sku)
          AND (CAST(:attribute AS text) IS NULL OR attribute = :attribute)
          AND (CAST(:label AS text) IS NULL OR label = :label)
        RETURNING sku, attribute, label
        """), {"sku": sku, "attribute": attribute, "label": label}).all()
    return [(r[0], r[1], r[2]) for r in rows]


def list_exemplars(conn: Connection, model_id: str, *, attribute: str | None = None, label: str | None = None,
                   limit: int | None = None) -> list[ExemplarRow]:
    rows = conn.execute(text(
        """
        SELECT x.sku, x.taxonomy, x.attribute, x.label, x.source, x.created_by, x.created_at,
               e.image_features IS NOT NULL AS has_features
        FROM exemplars x LEFT JOIN embeddings e ON e.sku = x.sku AND e.model_id = :m
        WHERE (CAST(:attribute AS text) IS NULL OR x.attribute = :attribute)
          AND (CAST(:label AS text) IS NULL OR x.label = :label)
        ORDER BY x.attribute, x.label, x.sku
        LIMIT :limit
        """), {"m": model_id, "attribute": attribute, "label": label, "limit": limit}).all()
    return [ExemplarRow(*r) for r in rows]


def load_exemplars(conn: Connection, model_id: str, attributes: Sequence[str] | None = None
                   ) -> dict[str, AttributeExemplars]:
    """Every exemplar whose product has stored features for ``model_id``, grouped by attribute (optionally only
    ``attributes``), with those features and the products' embeddings (for fitting the scale to the shop).
    Exemplars of products without features cannot take part and are left out (``tagger exemplars list`` shows
    them)."""
    rows = _binary_rows(conn, (
        "SELECT x.attribute, x.label, x.sku, e.image_features, e.image_embedding, e.text_embedding FROM exemplars x "
        "JOIN embeddings e ON e.sku = x.sku AND e.model_id = %s "
        "WHERE e.image_features IS NOT NULL AND (%s::text[] IS NULL OR x.attribute = ANY(%s::text[])) "
        "ORDER BY x.attribute, x.label, x.sku"),
        (model_id, None if attributes is None else list(attributes), None if attributes is None else list(attributes)))
    grouped: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    centre = catalog_feature_mean(conn, model_id) if grouped else None
    result: dict[str, AttributeExemplars] = {}
    for attribute, group in grouped.items():
        dims = {int.from_bytes(bytes(r[3][:2]), "big") for r in group}
        if len(dims) != 1:
            # Features of one model always have one size; several mean a model change mid-way: use the commonest.
            common = max(dims, key=lambda d: sum(int.from_bytes(bytes(r[3][:2]), "big") == d for r in group))
            group = [r for r in group if int.from_bytes(bytes(r[3][:2]), "big") == common]
        images = _matrix([bytes(r[4]) for r in group])
        texts = np.full_like(images, np.nan)
        has_text = [i for i, r in enumerate(group) if r[5] is not None]
        if has_text:
            texts[has_text] = _matrix([bytes(group[i][5]) for i in has_text])
        result[attribute] = AttributeExemplars(attribute, tuple(r[1] for r in group),
                                               halfvec_matrix([bytes(r[3]) for r in group]),
                                               tuple(r[2] for r in group), images, texts,
                                               centre if centre is not None and len(centre) == group_dim(group)
                                               else None)
    return result


def group_dim(group: Sequence[tuple[Any, ...]]) -> int:
    return int.from_bytes(bytes(group[0][3][:2]), "big")


def catalog_feature_mean(conn: Connection, model_id: str, sample: int = 20_000) -> np.ndarray | None:
    """Mean backbone feature vector of (up to ``sample`` of) the catalog's products: the origin exemplar cosines
    are measured from. Computed in Postgres (pgvector's ``avg``), so no feature leaves the database."""
    value = conn.execute(text(
        "SELECT avg(image_features) FROM (SELECT image_features FROM embeddings WHERE model_id = :m "
        "AND image_features IS NOT NULL LIMIT :n) AS sampled"), {"m": model_id, "n": sample}).scalar()
    return None if value is None else _array(value).astype(np.float32)


def features_page(conn: Connection, model_id: str, *, after: str | None, last: str) -> tuple[list[str], np.ndarray]:
    """Stored backbone features of the SKUs in (``after``, ``last``] (one page of the re-tag keyset walk), fetched
    in binary: the SKUs that have features, in SKU order, and their (n, d) features."""
    rows = _binary_rows(conn, (
        "SELECT sku, image_features FROM embeddings WHERE model_id = %s AND image_features IS NOT NULL "
        "AND (%s::text IS NULL OR sku > %s) AND sku <= %s ORDER BY sku"), (model_id, after, after, last))
    return [r[0] for r in rows], halfvec_matrix([bytes(r[1]) for r in rows])


def known_skus(conn: Connection, skus: Sequence[str], model_id: str) -> tuple[set[str], set[str]]:
    """Of ``skus``: those that are products, and those whose product has stored features for ``model_id``."""
    rows = conn.execute(text(
        """
        SELECT p.sku, bool_or(e.image_features IS NOT NULL)
        FROM products p LEFT JOIN embeddings e ON e.sku = p.sku AND e.model_id = :m
        WHERE p.sku = ANY(:skus) GROUP BY p.sku
        """), {"skus": list(skus), "m": model_id}).all()
    return {r[0] for r in rows}, {r[0] for r in rows if r[1]}


def exemplar_skus(conn: Connection, model_id: str) -> list[str]:
    """SKUs of exemplars whose product has no stored features for ``model_id`` (``tagger exemplars backfill``)."""
    return [r[0] for r in conn.execute(text(
        "SELECT DISTINCT x.sku FROM exemplars x LEFT JOIN embeddings e ON e.sku = x.sku AND e.model_id = :m "
        "WHERE e.image_features IS NULL ORDER BY x.sku"), {"m": model_id})]


def exemplars_stamp(conn: Connection) -> tuple[int, int, int]:
    """Changes whenever an exemplar is added or removed: a worker can keep ``load_exemplars``' result until it
    does, instead of reading every exemplar's features for each event batch."""
    row = conn.execute(text("SELECT count(*), coalesce(max(id), 0), coalesce(sum(id), 0) FROM exemplars")).one()
    return int(row[0]), int(row[1]), int(row[2])
