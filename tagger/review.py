"""The merchandisers' review rules (``/review`` on ``tagger serve``), with no I/O: queue filters, what a decision
changes, duplicate groups, health shares. SQL is in ``tagger.db.review_repository``, HTTP in ``tagger.web.review``.

A *review item* is one product's one attribute: the machine's ranked labels for it (rank 1 is its proposal) and
any rows a person decided. Its state is, in this order: ``approved`` (a person approved a label), ``rejected`` (a
person rejected the proposal and chose nothing), ``pending`` (the proposal is under its threshold:
``needs_review``), ``accepted`` (the machine was confident; nobody looked).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tagger.errors import TaggerError
from tagger.taxonomy.model import Attribute, TaxonomySet

# ---- errors (each maps to one HTTP status on the page) ---------------------------------------------------


class ReviewError(TaggerError):
    """A review request that cannot be carried out; the message says what to do instead."""

    stage = "review"
    status = 400


class UnknownProduct(ReviewError):
    status = 404


class UnknownAttribute(ReviewError):
    status = 404


class UnknownLabel(ReviewError):
    status = 422


class InvalidRequest(ReviewError):
    status = 422


class NothingToDecide(ReviewError):
    status = 409


class SelectionChanged(ReviewError):
    status = 409


class HeatmapUnavailable(ReviewError):
    status = 409


class NotSignedIn(ReviewError):
    status = 401


class Forbidden(ReviewError):
    status = 403


def attribute_with_label(taxonomies: TaxonomySet, attribute: str, label: str) -> Attribute:
    """The current taxonomies' attribute ``attribute``, once ``label`` is known to be one of its labels."""
    try:
        spec = taxonomies.attribute(attribute)
    except KeyError:
        raise UnknownAttribute(f"attribute {attribute!r} is not in the current taxonomies") from None
    if label not in {lab.key for lab in spec.labels}:
        raise UnknownLabel(f"{label!r} is not a label of {attribute}")
    return spec


# ---- queue filters ---------------------------------------------------------------------------------------

APPROVED, REJECTED, PENDING, ACCEPTED = "approved", "rejected", "pending", "accepted"
STATES = (PENDING, ACCEPTED, APPROVED, REJECTED)
# What the queue lists: undecided items by default; "decided" is approved or rejected.
SHOW = {"pending": (PENDING,), "accepted": (ACCEPTED,), "undecided": (PENDING, ACCEPTED),
        "decided": (APPROVED, REJECTED), "all": STATES}
# Confidence bands of the machine's proposal (lower bound inclusive, upper exclusive; 1.0 falls in "high").
BANDS: dict[str, tuple[float, float]] = {"very-low": (0.0, 0.3), "low": (0.3, 0.5), "medium": (0.5, 0.7),
                                         "high": (0.7, 1.000001)}
CATEGORY_ATTRIBUTE = "category"
PAGE_SIZE = 12
MAX_BULK = 5000


@dataclass(frozen=True)
class QueueFilter:
    attribute: str | None = None
    label: str | None = None
    band: str | None = None
    category: str | None = None
    version: str | None = None
    show: str = "pending"
    page: int = 1

    @property
    def states(self) -> tuple[str, ...]:
        return SHOW[self.show]

    @property
    def score_range(self) -> tuple[float, float] | None:
        return BANDS[self.band] if self.band else None

    def query(self, **changes: object) -> dict[str, str]:
        """The filter as URL query parameters (empty ones left out), with ``changes`` applied."""
        updated = replace(self, **changes)  # type: ignore[arg-type]
        params = {"attribute": updated.attribute, "label": updated.label, "band": updated.band,
                  "category": updated.category, "version": updated.version, "show": updated.show,
                  "page": str(updated.page) if updated.page != 1 else None}
        return {k: v for k, v in params.items() if v}


def parse_filter(params: Mapping[str, str], taxonomies: TaxonomySet) -> QueueFilter:
    """A queue filter from query parameters, refusing values that name nothing (``InvalidRequest``)."""
    def get(name: str) -> str | None:
        value = (params.get(name) or "").strip()
        return value or None

    attribute, label, band, category = get("attribute"), get("label"), get("band"), get("category")
    names = [a.name for a in taxonomies.attributes]
    if attribute is not None and attribute not in names:
        raise InvalidRequest(f"attribute {attribute!r} is not in the taxonomies; use one of: {', '.join(names)}")
    if label is not None:
        if attribute is None:
            raise InvalidRequest("a label filter needs an attribute: choose the attribute first")
        keys = [lab.key for lab in taxonomies.attribute(attribute).labels]
        if label not in keys:
            raise InvalidRequest(f"label {label!r} is not a label of {attribute}; use one of: {', '.join(keys)}")
    if band is not None and band not in BANDS:
        raise InvalidRequest(f"confidence band {band!r} is unknown; use one of: {', '.join(BANDS)}")
    if category is not None:
        try:
            keys = [lab.key for lab in taxonomies.attribute(CATEGORY_ATTRIBUTE).labels]
        except KeyError:
            raise InvalidRequest(f"there is no {CATEGORY_ATTRIBUTE!r} attribute to filter by") from None
        if category not in keys:
            raise InvalidRequest(f"category {category!r} is unknown; use a label key of the category attribute")
    show = get("show") or "pending"
    if show not in SHOW:
        raise InvalidRequest(f"show={show!r} is unknown; use one of: {', '.join(SHOW)}")
    raw_page = get("page") or "1"
    if not raw_page.isdigit() or int(raw_page) < 1:
        raise InvalidRequest(f"page={raw_page!r}: use a page number from 1")
    version = get("version")
    if version is not None and (len(version) > 64 or not version.replace("-", "").isalnum()):
        raise InvalidRequest(f"taxonomy version {version[:64]!r} is not a version id (see `tagger taxonomy history`)")
    return QueueFilter(attribute, label, band, category, version, show, min(int(raw_page), 100_000))


def band_of(score: float) -> str:
    for name, (low, high) in BANDS.items():
        if low <= score < high:
            return name
    return "high" if score >= 1.0 else "very-low"


# ---- decisions -------------------------------------------------------------------------------------------

ACTIONS = ("approve", "reject", "pick")
MANUAL_SCORE = 1.0  # score of a label a person chose that the machine had not proposed
MANUAL_RANK = 0  # rank of such a label: ranks 1.. are the machine's


@dataclass(frozen=True)
class TagRow:
    """One row of ``tags`` for a review item."""

    value: str
    score: float
    rank: int
    status: str
    source: str
    taxonomy: str
    path: str | None = None
    model_id: str | None = None
    taxonomy_version: str | None = None
    decided_by: str | None = None


@dataclass(frozen=True)
class TagWrite:
    """Make the row for ``value`` a person's tag with ``status`` (insert it when the machine never stored it)."""

    value: str
    status: str  # approved | rejected
    insert: bool
    score: float
    rank: int
    path: str | None


@dataclass(frozen=True)
class DecisionPlan:
    action: str
    chosen: str | None  # the approved label; None for a rejection
    machine: TagRow | None  # the machine's proposal (rank 1) when the person decided
    writes: tuple[TagWrite, ...] = field(default_factory=tuple)

    @property
    def changes_anything(self) -> bool:
        return bool(self.writes)


def item_state(rows: Iterable[TagRow]) -> str:
    statuses = {r.status for r in rows}
    if APPROVED in statuses:
        return APPROVED
    if REJECTED in statuses:
        return REJECTED
    if "needs_review" in statuses:
        return PENDING
    return ACCEPTED


def proposal(rows: Sequence[TagRow]) -> TagRow | None:
    """The machine's proposal: its rank-1 label (whatever a person did to it since)."""
    ranked = sorted((r for r in rows if r.rank >= 1), key=lambda r: (r.rank, -r.score, r.value))
    return ranked[0] if ranked else None


def plan_decision(attribute: Attribute, rows: Sequence[TagRow], action: str, value: str | None) -> DecisionPlan:
    """What one decision changes for one review item.

    - ``approve`` (``value`` defaults to the proposal): that label becomes a person's approved tag.
    - ``pick`` ``value``: that label becomes approved (added when the machine had not stored it), and for a
      single-valued attribute the proposal, if still undecided, becomes rejected.
    - ``reject`` (``value`` defaults to the proposal): that label becomes a person's rejected tag.

    For a single-valued attribute one label at most stays approved: approving one rejects an earlier approval.
    """
    if action not in ACTIONS:
        raise InvalidRequest(f"action {action!r} is unknown; use approve, reject or pick")
    machine = proposal(rows)
    by_value = {r.value: r for r in rows}
    if value is None:
        if action == "pick":
            raise InvalidRequest("pick needs the label to apply: choose one from the list")
        if machine is None:
            raise NothingToDecide(f"{attribute.name} has no machine tag to {action} for this product; pick a label")
        value = machine.value
    scored = {label.key for label in attribute.scored_labels}
    if value not in scored:
        known = value in {label.key for label in attribute.labels}
        hint = " (a parent label: choose one of its leaves)" if known else ""
        raise UnknownLabel(f"{value!r} is not a label of {attribute.name}{hint}; "
                           f"choose one of: {', '.join(sorted(scored))}")
    if action in ("approve", "reject") and value not in by_value:
        raise NothingToDecide(f"{attribute.name}={value} is not among this product's tags; use pick to add it")
    if action != "reject" and machine is not None:
        # Choosing the machine's own proposal is an approval; approving another label is a correction.
        action = "approve" if value == machine.value else "pick"

    writes: list[TagWrite] = []

    def set_status(row: TagRow, status: str) -> None:
        if row.status != status or row.source != "manual":
            writes.append(TagWrite(row.value, status, False, row.score, row.rank, row.path))

    if action == "reject":
        set_status(by_value[value], REJECTED)
        return DecisionPlan("reject", None, machine, tuple(writes))

    existing = by_value.get(value)
    if existing is None:
        path = attribute.path(value) if attribute.hierarchical else None
        writes.append(TagWrite(value, APPROVED, True, MANUAL_SCORE, MANUAL_RANK, path))
    else:
        set_status(existing, APPROVED)
    if attribute.kind == "single":
        for row in rows:
            if row.value == value:
                continue
            # An earlier approval of another label, or the machine's undecided proposal, is overruled.
            if row.status == APPROVED or (machine is not None and row.value == machine.value
                                          and row.status in ("accepted", "needs_review")):
                set_status(row, REJECTED)
    return DecisionPlan(action, value, machine, tuple(writes))


# ---- duplicates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DuplicatePairView:
    sku_a: str
    sku_b: str
    similarity: float
    verdict: str | None = None
    decided_by: str | None = None


@dataclass(frozen=True)
class DuplicateGroup:
    skus: tuple[str, ...]
    pairs: tuple[DuplicatePairView, ...]

    @property
    def best(self) -> float:
        return max(p.similarity for p in self.pairs)


def duplicate_groups(pairs: Iterable[DuplicatePairView]) -> list[DuplicateGroup]:
    """Connected components of the pair graph, most similar group first; pairs inside a group by similarity."""
    parent: dict[str, str] = {}

    def root(sku: str) -> str:
        parent.setdefault(sku, sku)
        while parent[sku] != sku:
            parent[sku] = parent[parent[sku]]
            sku = parent[sku]
        return sku

    kept = list(pairs)
    for pair in kept:
        a, b = root(pair.sku_a), root(pair.sku_b)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for sku in parent:
        members.setdefault(root(sku), []).append(sku)
    edges: dict[str, list[DuplicatePairView]] = {}
    for pair in kept:
        edges.setdefault(root(pair.sku_a), []).append(pair)
    groups = [DuplicateGroup(tuple(sorted(members[key])),
                             tuple(sorted(edges[key], key=lambda p: (-p.similarity, p.sku_a, p.sku_b))))
              for key in edges]
    return sorted(groups, key=lambda g: (-g.best, g.skus))


def ordered_pair(sku_a: str, sku_b: str) -> tuple[str, str]:
    if sku_a == sku_b:
        raise InvalidRequest("a duplicate verdict needs two different SKUs")
    return (sku_a, sku_b) if sku_a < sku_b else (sku_b, sku_a)


# ---- health ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeHealth:
    attribute: str
    counts: dict[str, int]  # state -> products

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, state: str) -> float:
        return self.counts.get(state, 0) / self.total if self.total else 0.0


def attribute_health(rows: Iterable[tuple[str, str, int]], order: Sequence[str] = ()) -> list[AttributeHealth]:
    """Per attribute, products in each state, from (attribute, state, count) rows; attributes in ``order``
    first (taxonomy order), the rest alphabetically."""
    counts: dict[str, dict[str, int]] = {}
    for attribute, state, count in rows:
        counts.setdefault(attribute, {s: 0 for s in STATES})[state] = int(count)
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(counts, key=lambda n: (rank.get(n, len(rank)), n))
    return [AttributeHealth(name, counts[name]) for name in names]


@dataclass(frozen=True)
class AgreementPoint:
    day: str  # ISO date
    agreed: int  # approvals of the machine's proposal
    decided: int  # all decisions that day

    @property
    def rate(self) -> float:
        return self.agreed / self.decided if self.decided else math.nan


def agreement_series(rows: Iterable[tuple[str, int, int]]) -> list[AgreementPoint]:
    """Agreement of people with the machine per day, from (day, agreed, decided) rows, oldest first."""
    return sorted((AgreementPoint(str(d), int(a), int(n)) for d, a, n in rows), key=lambda p: p.day)
