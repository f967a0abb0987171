"""Checks on exemplars, pure (no I/O): import rows against the taxonomies and the catalog, and contradictions
between stored exemplars."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np

from tagger import fewshot
from tagger.errors import TaggerError
from tagger.taxonomy.model import Attribute, TaxonomySet

COLUMNS = ("sku", "attribute", "label")


class ExemplarError(TaggerError):
    """An exemplar command cannot do what was asked; the message says what to change."""

    stage = "exemplars"


class ExemplarImportError(ExemplarError):
    """An import file has bad rows; ``problems`` lists each with its line. Nothing was imported."""

    def __init__(self, problems: Sequence[RowProblem], path: str):
        self.problems = list(problems)
        lines = "\n".join(f"{path}:{p.line}: {p.reason}" for p in self.problems)
        super().__init__(f"{lines}\n{len(self.problems)} bad row(s) in {path}; nothing was imported. Fix them, or "
                         "run again with --skip-bad to import only the good rows")


@dataclass(frozen=True)
class ImportRow:
    line: int  # line in the file (the header is line 1)
    sku: str
    attribute: str
    label: str  # as written in the file


@dataclass(frozen=True)
class RowProblem:
    line: int
    reason: str


@dataclass(frozen=True)
class GoodRow:
    line: int
    sku: str
    taxonomy: str
    attribute: str
    label: str  # label key


def read_rows(content: str, path: str = "file") -> list[ImportRow]:
    """Rows of a CSV with the columns sku, attribute, label (any order, other columns ignored)."""
    reader = csv.DictReader(io.StringIO(content.lstrip("\ufeff")))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ExemplarError(f"{path}: the header must name the columns {', '.join(COLUMNS)}; missing: "
                            f"{', '.join(missing)} (found: {', '.join(header) or 'nothing'})")
    reader.fieldnames = header
    rows = []
    for record in reader:
        line = reader.line_num
        rows.append(ImportRow(line, *(str(record.get(c) or "").strip() for c in COLUMNS)))
    if not rows:
        raise ExemplarError(f"{path}: no rows under the header; nothing to import")
    return rows


def _label_key(attribute: Attribute, written: str) -> tuple[str | None, str | None]:
    """The scored label key a file's value names (a key, a display name or a synonym), or the reason it does not."""
    scored = {label.key for label in attribute.scored_labels}
    label = next((lab for lab in attribute.labels if lab.key == written), None) or attribute.match_value(written)
    if label is None:
        keys = ", ".join(sorted(scored)[:12]) + (", ..." if len(scored) > 12 else "")
        return None, f"unknown label {written!r} for attribute {attribute.name!r}; use one of its label keys ({keys})"
    if label.key not in scored:
        leaves = sorted(lab.key for lab in attribute.labels if label.key in attribute.ancestors(lab.key)
                        and lab.key in scored)
        return None, (f"label {label.key!r} of {attribute.name!r} groups other labels and is not scored itself; use "
                      f"one of the labels under it ({', '.join(leaves[:8])}{', ...' if len(leaves) > 8 else ''})")
    return label.key, None


def validate_rows(rows: Sequence[ImportRow], taxonomies: TaxonomySet, products: Set[str],
                  with_features: Set[str]) -> tuple[list[GoodRow], list[RowProblem]]:
    """Split import rows into good ones and problems (one per bad row, with its reason).

    A row is bad when a field is empty, the attribute or label is unknown, the label is a group label of a
    hierarchy, the SKU is not a product, the product has no stored image features (it cannot teach anything
    until re-encoded), or it gives a single-label attribute a second label for a SKU earlier in the file."""
    attributes = {a.name: a for a in taxonomies.attributes}
    good: list[GoodRow] = []
    problems: list[RowProblem] = []
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for row in rows:
        empty = [c for c, v in zip(COLUMNS, (row.sku, row.attribute, row.label)) if not v]
        if empty:
            problems.append(RowProblem(row.line, f"empty {', '.join(empty)}"))
            continue
        attribute = attributes.get(row.attribute)
        if attribute is None:
            problems.append(RowProblem(row.line, f"unknown attribute {row.attribute!r}; known: "
                                                 f"{', '.join(sorted(attributes))}"))
            continue
        key, reason = _label_key(attribute, row.label)
        if key is None:
            problems.append(RowProblem(row.line, str(reason)))
            continue
        if row.sku not in products:
            problems.append(RowProblem(row.line, f"unknown SKU {row.sku!r}: no such product in the catalog"))
            continue
        if row.sku not in with_features:
            problems.append(RowProblem(row.line, f"SKU {row.sku!r} has no stored image features yet (encoded before "
                                                 "they were kept): run `tagger exemplars backfill`, or re-send the "
                                                 "product, then import it"))
            continue
        earlier = seen.get((row.sku, attribute.name))
        if earlier is not None and earlier[0] != key and attribute.kind == "single":
            problems.append(RowProblem(row.line, f"SKU {row.sku!r} was given {earlier[0]!r} on line {earlier[1]} for "
                                                 f"single-label attribute {attribute.name!r}; keep one of the two"))
            continue
        seen.setdefault((row.sku, attribute.name), (key, row.line))
        good.append(GoodRow(row.line, row.sku, attribute.taxonomy, attribute.name, key))
    return good, problems


@dataclass(frozen=True)
class Contradiction:
    attribute: str
    sku: str
    kind: str  # "two_labels" | "nearer_other"
    message: str


def same_product_two_labels(rows: Sequence[tuple[str, str, str]], taxonomies: TaxonomySet
                            ) -> list[Contradiction]:
    """(sku, attribute, label) exemplar rows that give one product two labels of a single-label attribute."""
    labels: dict[tuple[str, str], set[str]] = {}
    for sku, attribute, label in rows:
        labels.setdefault((attribute, sku), set()).add(label)
    kinds = {a.name: a.kind for a in taxonomies.attributes}
    return [Contradiction(attribute, sku, "two_labels",
                          f"{sku} is an exemplar of both {' and '.join(sorted(found))} for single-label attribute "
                          f"{attribute!r}; remove the wrong one (tagger exemplars remove --sku {sku} --attribute "
                          f"{attribute})")
            for (attribute, sku), found in sorted(labels.items())
            if len(found) > 1 and kinds.get(attribute, "single") == "single"]


def nearer_other_label(exemplars: Mapping[str, fewshot.AttributeExemplars], margin: float = 0.0
                       ) -> list[Contradiction]:
    """Exemplars whose features are nearer (cosine, centred as in scoring) to another label's centroid than to
    the centroid of their own label's other exemplars: mislabelled, or a label whose examples overlap another's.
    A label's only exemplar is compared with nothing of its own and is not reported."""
    found: list[Contradiction] = []
    for attribute, ex in sorted(exemplars.items()):
        keys = sorted(set(ex.labels))
        if len(keys) < 2:
            continue
        prepared = fewshot.prepare(ex, keys)
        if prepared is None:
            continue
        unit = fewshot.exemplar_cosines(prepared, ex.features)  # (n, labels) to full centroids
        centred = np.asarray(ex.features, dtype=np.float64) - prepared.centre
        centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
        index = {k: i for i, k in enumerate(keys)}
        sums = np.zeros((len(keys), centred.shape[1]))
        np.add.at(sums, [index[k] for k in ex.labels], centred)
        for i, (label, sku) in enumerate(zip(ex.labels, ex.skus or [""] * len(ex.labels))):
            own = index[label]
            if prepared.counts[own] < 2:
                continue
            rest = sums[own] - centred[i]  # the label's centroid without this exemplar
            own_cos = float(centred[i] @ rest / max(np.linalg.norm(rest), 1e-12))
            others = unit[i].copy()
            others[own] = -np.inf
            best = int(np.argmax(others))
            if others[best] > own_cos + margin:
                found.append(Contradiction(attribute, sku, "nearer_other",
                                           f"{sku} ({attribute}={label}) looks more like the exemplars of "
                                           f"{keys[best]!r} (cosine {others[best]:.2f}) than those of {label!r} "
                                           f"({own_cos:.2f}); check its label"))
    return found
