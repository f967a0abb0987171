"""SQL of the review page: the queue, decisions, duplicate verdicts, health figures, the heat-map cache.

Every decision goes through ``record_decision`` (one place to hook what a decision should also do). Decisions
take the SKU's advisory lock that the pipeline takes for its writes, so a decision and a worker re-tagging the same
product never interleave; machine writes never touch a row a person decided (``repository.MACHINE_TAG_CONFLICT``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from tagger.db import exemplar_repository as exemplar_repo
from tagger.db import repository as repo
from tagger.review import (
    ACCEPTED,
    CATEGORY_ATTRIBUTE,
    MAX_BULK,
    PENDING,
    DecisionPlan,
    DuplicatePairView,
    InvalidRequest,
    NothingToDecide,
    QueueFilter,
    SelectionChanged,
    TagRow,
    UnknownAttribute,
    UnknownProduct,
    ordered_pair,
    plan_decision,
)
from tagger.taxonomy.model import TaxonomySet

MAX_NAME = 64


@dataclass(frozen=True)
class ProductCard:
    sku: str
    title: str
    brand: str | None
    image_ref: str | None
    image_hash: str | None
    tags: dict[str, list[TagRow]]  # attribute -> rows (approved first, then by rank)
    matched: frozenset[str]  # attributes of this product that the filter selects


@dataclass(frozen=True)
class QueuePage:
    cards: list[ProductCard]
    products: int  # products the filter selects (all pages)
    items: int  # review items the filter selects
    undecided: int  # of those, pending or accepted: what bulk approve would approve


@dataclass(frozen=True)
class DecisionOutcome:
    sku: str
    attribute: str
    plan: DecisionPlan

    @property
    def changed(self) -> bool:
        return self.plan.changes_anything


def reviewer_name(who: str | None) -> str:
    name = " ".join((who or "").split())
    if not name:
        raise InvalidRequest("say who you are: the reviewer name is recorded with every decision")
    if len(name) > MAX_NAME or not name.isprintable():
        raise InvalidRequest(f"the reviewer name must be printable and at most {MAX_NAME} characters")
    return name


# ---- review items ----------------------------------------------------------------------------------------

_ROW_COLUMNS = "value, score, rank, status, source, taxonomy, path, model_id, taxonomy_version, decided_by"
_ROW_ORDER = "(status = 'approved') DESC, (status = 'rejected'), rank, score DESC, value"


def _tag_row(row: Any) -> TagRow:
    return TagRow(row[0], float(row[1]), int(row[2]), row[3], row[4], row[5], row[6], row[7], row[8], row[9])


def product_exists(conn: Connection, sku: str) -> bool:
    return conn.execute(text("SELECT 1 FROM products WHERE sku = :s"), {"s": sku}).first() is not None


def item_rows(conn: Connection, sku: str, attribute: str, *, lock: bool = False) -> list[TagRow]:
    rows = conn.execute(text(f"SELECT {_ROW_COLUMNS} FROM tags WHERE sku = :s AND attribute = :a "
                             f"ORDER BY {_ROW_ORDER}" + (" FOR UPDATE" if lock else "")),
                        {"s": sku, "a": attribute}).all()
    return [_tag_row(r) for r in rows]


def record_decision(conn: Connection, taxonomies: TaxonomySet, *, sku: str, attribute: str, action: str,
                    value: str | None, who: str, bulk: bool = False) -> DecisionOutcome:
    """Apply one reviewer decision on (``sku``, ``attribute``) and log it, in the caller's transaction.

    Rows a person decided become ``source = 'manual'`` with ``decided_by``/``decided_at``. A decision that
    changes nothing (approving what is already approved) writes nothing and is not logged.
    """
    who = reviewer_name(who)
    repo.lock_sku(conn, sku)
    if not product_exists(conn, sku):
        raise UnknownProduct(f"product {sku!r} does not exist (deleted since the page was loaded?)")
    try:
        spec = taxonomies.attribute(attribute)
    except KeyError:
        raise UnknownAttribute(f"attribute {attribute!r} is not in the current taxonomies; "
                               f"use one of: {', '.join(a.name for a in taxonomies.attributes)}") from None
    rows = item_rows(conn, sku, attribute, lock=True)
    plan = plan_decision(spec, rows, action, value)
    if not plan.changes_anything:
        return DecisionOutcome(sku, attribute, plan)
    machine = plan.machine
    version = machine.taxonomy_version if machine and machine.taxonomy_version else taxonomies.versions[spec.taxonomy]
    for write in plan.writes:
        if write.insert:
            conn.execute(text(
                """
                INSERT INTO tags AS t (sku, taxonomy, attribute, value, score, rank, path, model_id, taxonomy_version,
                                       source, status, decided_by, decided_at)
                VALUES (:sku, :taxonomy, :attribute, :value, :score, :rank, :path, NULL, :version, 'manual', :status,
                        :who, now())
                ON CONFLICT (sku, attribute, value) DO UPDATE SET
                    source = 'manual', status = EXCLUDED.status, decided_by = EXCLUDED.decided_by,
                    decided_at = EXCLUDED.decided_at, updated_at = now()
                """), {"sku": sku, "taxonomy": spec.taxonomy, "attribute": attribute, "value": write.value,
                       "score": write.score, "rank": write.rank, "path": write.path, "version": version,
                       "status": write.status, "who": who})
        else:
            conn.execute(text(
                "UPDATE tags SET source = 'manual', status = :status, decided_by = :who, decided_at = now(), "
                "updated_at = now() WHERE sku = :sku AND attribute = :attribute AND value = :value"),
                {"status": write.status, "who": who, "sku": sku, "attribute": attribute, "value": write.value})
    conn.execute(text(
        """
        INSERT INTO review_decisions (sku, taxonomy, attribute, action, machine_value, machine_score, machine_status,
                                      chosen_value, model_id, taxonomy_version, bulk, decided_by)
        VALUES (:sku, :taxonomy, :attribute, :action, :mv, :ms, :mst, :chosen, :model, :version, :bulk, :who)
        """), {"sku": sku, "taxonomy": spec.taxonomy, "attribute": attribute, "action": plan.action,
               "mv": machine.value if machine else None, "ms": machine.score if machine else None,
               "mst": machine.status if machine else None, "chosen": plan.chosen,
               "model": machine.model_id if machine else None, "version": version, "bulk": bulk, "who": who})
    if plan.action in ("approve", "pick") and plan.chosen:
        # Every approval or correction is a labelled example of the shop's own look (tagger.fewshot).
        exemplar_repo.add_exemplar(conn, sku=sku, attribute=attribute, label=plan.chosen, taxonomy=spec.taxonomy,
                                   source="review_approval" if plan.action == "approve" else "review_correction",
                                   created_by=who)
    return DecisionOutcome(sku, attribute, plan)


# ---- the queue -------------------------------------------------------------------------------------------

_ITEMS = """
    WITH items AS (
        SELECT t.sku, t.attribute,
               CASE WHEN bool_or(t.status = 'approved') THEN 'approved'
                    WHEN bool_or(t.status = 'rejected') THEN 'rejected'
                    WHEN bool_or(t.status = 'needs_review') THEN 'pending'
                    ELSE 'accepted' END AS state,
               (array_agg(t.value ORDER BY t.rank, t.score DESC) FILTER (WHERE t.rank >= 1))[1] AS top_value,
               (array_agg(t.score ORDER BY t.rank, t.score DESC) FILTER (WHERE t.rank >= 1))[1] AS top_score,
               (array_agg(t.taxonomy_version ORDER BY t.rank, t.score DESC) FILTER (WHERE t.rank >= 1))[1] AS version
        FROM tags t
        WHERE CAST(:attribute AS text) IS NULL OR t.attribute = :attribute
        GROUP BY t.sku, t.attribute
    ), matching AS (
        SELECT i.* FROM items i
        WHERE i.state = ANY(:states)
          AND (CAST(:label AS text) IS NULL OR i.top_value = :label)
          AND (CAST(:low AS float8) IS NULL OR (i.top_score >= :low AND i.top_score < :high))
          AND (CAST(:version AS text) IS NULL OR i.version = :version)
          AND (CAST(:category AS text) IS NULL OR EXISTS (
                SELECT 1 FROM tags c
                WHERE c.sku = i.sku AND c.attribute = :category_attribute
                  AND c.status IN ('accepted', 'needs_review', 'approved')
                  AND :category = ANY(string_to_array(coalesce(c.path, c.value), ' > '))))
    )
"""


def _filter_params(f: QueueFilter) -> dict[str, Any]:
    low, high = f.score_range or (None, None)
    return {"attribute": f.attribute, "states": list(f.states), "label": f.label, "low": low, "high": high,
            "version": f.version, "category": f.category, "category_attribute": CATEGORY_ATTRIBUTE}


def queue_page(conn: Connection, f: QueueFilter, page_size: int) -> QueuePage:
    """The products the filter selects, products with pending tags first (the most doubtful first)."""
    params = _filter_params(f)
    products, items, undecided = conn.execute(text(
        _ITEMS + "SELECT count(DISTINCT sku), count(*), count(*) FILTER (WHERE state IN ('pending', 'accepted')) "
                 "FROM matching"), params).one()
    listed = conn.execute(text(
        _ITEMS + """
        SELECT sku, array_agg(attribute) FROM matching GROUP BY sku
        ORDER BY bool_or(state = 'pending') DESC, min(top_score) FILTER (WHERE state = 'pending') NULLS LAST,
                 min(top_score), sku
        LIMIT :limit OFFSET :offset
        """), {**params, "limit": page_size, "offset": (f.page - 1) * page_size}).all()
    skus = [r[0] for r in listed]
    matched = {r[0]: frozenset(r[1]) for r in listed}
    info = {r[0]: r for r in conn.execute(text(
        "SELECT sku, title, brand, image_ref, image_hash FROM products WHERE sku = ANY(:s)"), {"s": skus})}
    tags: dict[str, dict[str, list[TagRow]]] = {sku: {} for sku in skus}
    for row in conn.execute(text(f"SELECT sku, attribute, {_ROW_COLUMNS} FROM tags WHERE sku = ANY(:s) "
                                 f"ORDER BY sku, attribute, {_ROW_ORDER}"), {"s": skus}):
        tags[row[0]].setdefault(row[1], []).append(_tag_row(row[2:]))
    cards = [ProductCard(sku, info[sku][1], info[sku][2], info[sku][3], info[sku][4], tags[sku], matched[sku])
             for sku in skus if sku in info]
    return QueuePage(cards, int(products), int(items), int(undecided))


def product_card(conn: Connection, sku: str) -> ProductCard:
    row = conn.execute(text("SELECT sku, title, brand, image_ref, image_hash FROM products WHERE sku = :s"),
                       {"s": sku}).first()
    if row is None:
        raise UnknownProduct(f"product {sku!r} does not exist")
    tags: dict[str, list[TagRow]] = {}
    for tag in conn.execute(text(f"SELECT attribute, {_ROW_COLUMNS} FROM tags WHERE sku = :s "
                                 f"ORDER BY attribute, {_ROW_ORDER}"), {"s": sku}):
        tags.setdefault(tag[0], []).append(_tag_row(tag[1:]))
    return ProductCard(row[0], row[1], row[2], row[3], row[4], tags, frozenset(tags))


def bulk_approve(conn: Connection, taxonomies: TaxonomySet, f: QueueFilter, *, expected: int, who: str) -> int:
    """Approve the machine's proposal of every undecided item the filter selects (all pages), all or nothing.

    ``expected`` is the count the reviewer saw; if the selection changed since, nothing is approved.
    """
    undecided = [s for s in f.states if s in (PENDING, ACCEPTED)]
    if not undecided:
        raise NothingToDecide("this filter shows only decided tags; there is nothing to approve")
    params = {**_filter_params(f), "states": undecided}
    targets = conn.execute(text(_ITEMS + "SELECT sku, attribute FROM matching ORDER BY sku, attribute"),
                           params).all()
    if len(targets) != expected:
        raise SelectionChanged(f"the filter now selects {len(targets)} undecided tags, not the {expected} you saw; "
                               "reload the page and check them again")
    if len(targets) > MAX_BULK:
        raise InvalidRequest(f"{len(targets)} tags at once is too many; narrow the filter to at most {MAX_BULK}")
    for sku, attribute in targets:
        record_decision(conn, taxonomies, sku=sku, attribute=attribute, action="approve", value=None, who=who,
                        bulk=True)
    return len(targets)


def taxonomy_versions_in_use(conn: Connection) -> list[tuple[str, str, int]]:
    """(taxonomy, version, tags) of the versions that tags carry, most used first."""
    rows = conn.execute(text("SELECT taxonomy, taxonomy_version, count(*) FROM tags WHERE taxonomy_version IS NOT NULL "
                             "GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2")).all()
    return [(r[0], r[1], int(r[2])) for r in rows]


# ---- duplicates ------------------------------------------------------------------------------------------


def duplicate_pairs(conn: Connection, *, decided: bool) -> list[DuplicatePairView]:
    """Open pairs (stored matches without a verdict), or, with ``decided``, every pair a person judged."""
    if decided:
        sql = ("SELECT sku_a, sku_b, coalesce(similarity, 0), verdict, decided_by FROM duplicate_verdicts "
               "ORDER BY decided_at DESC, sku_a, sku_b")
    else:
        sql = ("SELECT m.sku_a, m.sku_b, max(m.similarity), NULL, NULL FROM duplicate_matches m "
               "WHERE NOT EXISTS (SELECT 1 FROM duplicate_verdicts v WHERE v.sku_a = m.sku_a AND v.sku_b = m.sku_b) "
               "GROUP BY m.sku_a, m.sku_b")
    return [DuplicatePairView(r[0], r[1], float(r[2]), r[3], r[4]) for r in conn.execute(text(sql))]


def verdict_of(conn: Connection, sku_a: str, sku_b: str) -> DuplicatePairView | None:
    a, b = ordered_pair(sku_a, sku_b)
    row = conn.execute(text(
        """
        SELECT :a, :b, coalesce(v.similarity, (SELECT max(similarity) FROM duplicate_matches WHERE sku_a = :a
                                                AND sku_b = :b), 0), v.verdict, v.decided_by
        FROM (SELECT 1) one LEFT JOIN duplicate_verdicts v ON v.sku_a = :a AND v.sku_b = :b
        """), {"a": a, "b": b}).one()
    return DuplicatePairView(row[0], row[1], float(row[2]), row[3], row[4])


def record_verdict(conn: Connection, sku_a: str, sku_b: str, verdict: str, who: str) -> DuplicatePairView:
    """Store a person's verdict on a pair. "different" also removes the stored match (every model's): the
    matcher never proposes the pair again (``repository.replace_duplicates``)."""
    who = reviewer_name(who)
    if verdict not in ("same", "different"):
        raise InvalidRequest(f"verdict {verdict!r} is unknown; use same or different")
    a, b = ordered_pair(sku_a, sku_b)
    for sku in (a, b):
        repo.lock_sku(conn, sku)
    for sku in (a, b):
        if not product_exists(conn, sku):
            raise UnknownProduct(f"product {sku!r} does not exist (deleted since the page was loaded?)")
    similarity = conn.execute(text("SELECT max(similarity) FROM duplicate_matches WHERE sku_a = :a AND sku_b = :b"),
                              {"a": a, "b": b}).scalar()
    known = conn.execute(text("SELECT 1 FROM duplicate_verdicts WHERE sku_a = :a AND sku_b = :b"),
                         {"a": a, "b": b}).first()
    if similarity is None and known is None:
        raise NothingToDecide(f"{a} and {b} are not a proposed near-duplicate pair")
    conn.execute(text(
        """
        INSERT INTO duplicate_verdicts AS v (sku_a, sku_b, verdict, similarity, decided_by)
        VALUES (:a, :b, :verdict, :similarity, :who)
        ON CONFLICT (sku_a, sku_b) DO UPDATE SET verdict = EXCLUDED.verdict,
            similarity = coalesce(EXCLUDED.similarity, v.similarity), decided_by = EXCLUDED.decided_by,
            decided_at = now()
        """), {"a": a, "b": b, "verdict": verdict, "similarity": similarity, "who": who})
    if verdict == "different":
        conn.execute(text("DELETE FROM duplicate_matches WHERE sku_a = :a AND sku_b = :b"), {"a": a, "b": b})
    view = verdict_of(conn, a, b)
    assert view is not None
    return view


def products_brief(conn: Connection, skus: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """sku -> (title, brand)."""
    rows = conn.execute(text("SELECT sku, title, brand FROM products WHERE sku = ANY(:s)"), {"s": list(skus)})
    return {r[0]: (r[1], r[2]) for r in rows}


# ---- health ----------------------------------------------------------------------------------------------


def state_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(attribute, state, products) over every product's every tagged attribute."""
    rows = conn.execute(text(
        """
        SELECT attribute, state, count(*) FROM (
            SELECT sku, attribute,
                   CASE WHEN bool_or(status = 'approved') THEN 'approved'
                        WHEN bool_or(status = 'rejected') THEN 'rejected'
                        WHEN bool_or(status = 'needs_review') THEN 'pending'
                        ELSE 'accepted' END AS state
            FROM tags GROUP BY sku, attribute) items
        GROUP BY attribute, state
        """)).all()
    return [(r[0], r[1], int(r[2])) for r in rows]


def agreement_by_day(conn: Connection, days: int = 90) -> list[tuple[str, int, int]]:
    """(day, decisions that approved the machine's proposal, decisions) per UTC day; bulk approvals left out
    (they are not a person looking at each tag)."""
    rows = conn.execute(text(
        """
        SELECT to_char(decided_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,
               count(*) FILTER (WHERE action = 'approve' AND chosen_value IS NOT DISTINCT FROM machine_value),
               count(*)
        FROM review_decisions
        WHERE NOT bulk AND decided_at >= now() - make_interval(days => :days)
        GROUP BY 1 ORDER BY 1
        """), {"days": days}).all()
    return [(r[0], int(r[1]), int(r[2])) for r in rows]


def decision_totals(conn: Connection) -> dict[str, int]:
    rows = conn.execute(text("SELECT action || CASE WHEN bulk THEN '_bulk' ELSE '' END, count(*) "
                             "FROM review_decisions GROUP BY 1")).all()
    return {r[0]: int(r[1]) for r in rows}


def most_corrected(conn: Connection, limit: int = 10) -> list[tuple[str, str, int, int, str | None]]:
    """(attribute, machine label, corrections, of which rejections, the label people chose most instead)."""
    rows = conn.execute(text(
        """
        SELECT attribute, machine_value, count(*), count(*) FILTER (WHERE action = 'reject'),
               mode() WITHIN GROUP (ORDER BY chosen_value)
        FROM review_decisions
        WHERE action IN ('pick', 'reject') AND machine_value IS NOT NULL
        GROUP BY attribute, machine_value
        ORDER BY 3 DESC, 1, 2
        LIMIT :limit
        """), {"limit": limit}).all()
    return [(r[0], r[1], int(r[2]), int(r[3]), r[4]) for r in rows]


# ---- heat maps -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainTarget:
    sku: str
    image_ref: str
    image_hash: str | None
    taxonomy: str
    taxonomy_version: str
    score: float | None  # the stored score of the label for this product, when it has a row


def explain_target(conn: Connection, sku: str, attribute: str, label: str, *, taxonomy: str,
                   current_version: str) -> ExplainTarget:
    product = conn.execute(text("SELECT image_ref, image_hash FROM products WHERE sku = :s"), {"s": sku}).first()
    if product is None:
        raise UnknownProduct(f"product {sku!r} does not exist")
    if not product[0]:
        raise NothingToDecide(f"product {sku!r} has no image to explain")
    row = conn.execute(text(
        "SELECT taxonomy_version, score FROM tags WHERE sku = :s AND attribute = :a "
        "ORDER BY (value = :v) DESC, rank LIMIT 1"), {"s": sku, "a": attribute, "v": label}).first()
    own = conn.execute(text("SELECT score FROM tags WHERE sku = :s AND attribute = :a AND value = :v AND rank >= 1"),
                       {"s": sku, "a": attribute, "v": label}).scalar()
    version = row[0] if row and row[0] else current_version
    return ExplainTarget(sku, product[0], product[1], taxonomy, version, None if own is None else float(own))


def cached_heatmap(conn: Connection, sku: str, attribute: str, label: str, model_id: str, image_hash: str
                   ) -> tuple[bytes, float, float, datetime] | None:
    row = conn.execute(text(
        "SELECT png, base_score, max_drop, created_at FROM review_heatmaps WHERE sku = :s AND attribute = :a "
        "AND label = :l AND model_id = :m AND image_hash = :h"),
        {"s": sku, "a": attribute, "l": label, "m": model_id, "h": image_hash}).first()
    return None if row is None else (bytes(row[0]), float(row[1]), float(row[2]), row[3])


def store_heatmap(conn: Connection, *, sku: str, attribute: str, label: str, model_id: str, image_hash: str,
                  png: bytes, base_score: float, max_drop: float, grid: int, seconds: float) -> None:
    conn.execute(text(
        """
        INSERT INTO review_heatmaps (sku, attribute, label, model_id, image_hash, png, base_score, max_drop, grid,
                                     seconds)
        VALUES (:s, :a, :l, :m, :h, :png, :base, :drop, :grid, :seconds)
        ON CONFLICT (sku, attribute, label, model_id, image_hash) DO UPDATE SET
            png = EXCLUDED.png, base_score = EXCLUDED.base_score, max_drop = EXCLUDED.max_drop,
            grid = EXCLUDED.grid, seconds = EXCLUDED.seconds, created_at = now()
        """), {"s": sku, "a": attribute, "l": label, "m": model_id, "h": image_hash, "png": png,
               "base": base_score, "drop": max_drop, "grid": grid, "seconds": seconds})
