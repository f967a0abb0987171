"""What changed between two taxonomy sets, and what re-tagging each change needs. Pure: no I/O.

Every change gets an *effect*:

- ``rescore``: label prototypes or the set of products an attribute applies to changed (labels added or
  removed, prompt texts, prompt templates, hierarchy, ``top_k``, ``applies_to``, a new attribute). The
  attribute's tags are recomputed from the stored embeddings. Attributes whose ``applies_to`` names a
  re-scored attribute are re-scored too (their products may change).
- ``redecide``: only thresholds or ``kind`` changed. Statuses are re-evaluated from the stored scores.
- ``drop``: the attribute was removed; its machine tags are deleted.
- ``none``: display-only (display names with explicit prompts, translations, descriptions, synonyms that
  are not prompt texts). A new taxonomy version is recorded; no tag changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tagger.taxonomy.model import Attribute, Label, Taxonomy, TaxonomySet

RESCORE = "rescore"
REDECIDE = "redecide"
DROP = "drop"
NONE = "none"
_STRENGTH = {NONE: 0, REDECIDE: 1, RESCORE: 2, DROP: 3}


@dataclass(frozen=True)
class Change:
    kind: str  # e.g. label_added, label_renamed, threshold_changed (see ``diff_taxonomies``)
    taxonomy: str
    attribute: str
    label: str | None = None
    before: Any = None
    after: Any = None
    effect: str = NONE

    @property
    def where(self) -> str:
        return f"{self.attribute}.{self.label}" if self.label else self.attribute

    def describe(self) -> str:
        b, a = _show(self.before), _show(self.after)
        text = {
            "attribute_added": "new attribute",
            "attribute_removed": "attribute removed (its machine tags are deleted)",
            "label_added": f"new label {a}",
            "label_removed": f"label removed (was {b})",
            "label_renamed": f"renamed {b} -> {a}",
            "prompts_changed": "prompt texts changed",
            "synonyms_changed": f"synonyms {b} -> {a}",
            "translations_changed": f"translations {b} -> {a}",
            "parent_changed": f"parent {b} -> {a}",
            "label_threshold_changed": f"label threshold {b} -> {a}",
            "threshold_changed": f"threshold {b} -> {a}",
            "kind_changed": f"kind {b} -> {a}",
            "top_k_changed": f"top_k {b} -> {a}",
            "hierarchical_changed": f"hierarchical {b} -> {a}",
            "conditions_changed": f"applies_to {b} -> {a}",
            "templates_changed": "prompt templates changed",
            "display_name_changed": f"display name {b} -> {a}",
            "taxonomy_changed": f"moved from taxonomy {b} to {a}",
        }.get(self.kind, self.kind)
        return text

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "taxonomy": self.taxonomy, "attribute": self.attribute, "label": self.label,
                "before": _jsonable(self.before), "after": _jsonable(self.after), "effect": self.effect}


@dataclass(frozen=True)
class TaxonomyDiff:
    changes: tuple[Change, ...]
    old_versions: dict[str, str]
    new_versions: dict[str, str]
    rescore: tuple[str, ...] = ()  # attributes to re-score, in scoring order (dependants included)
    redecide: tuple[str, ...] = ()  # attributes whose statuses are re-evaluated from stored scores
    drop: tuple[str, ...] = ()  # removed attributes whose machine tags are deleted
    dependants: dict[str, str] = field(default_factory=dict)  # attribute re-scored because its condition was

    @property
    def empty(self) -> bool:
        """No change at all, not even a new version (applying it writes nothing)."""
        return not self.changes and self.old_versions == self.new_versions

    @property
    def retags(self) -> bool:
        return bool(self.rescore or self.redecide or self.drop)

    @property
    def changed_taxonomies(self) -> list[str]:
        return sorted(name for name, version in self.new_versions.items() if self.old_versions.get(name) != version)

    def plan(self) -> dict[str, list[str]]:
        return {"rescore": list(self.rescore), "redecide": list(self.redecide), "drop": list(self.drop)}

    def to_json(self) -> dict[str, Any]:
        return {"from": self.old_versions, "to": self.new_versions, "plan": self.plan(),
                "dependants": self.dependants, "changes": [c.to_json() for c in self.changes]}


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show_inner(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show_inner(v) for v in value) + "]"
    return str(value)


def _show_inner(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _label_changes(taxonomy: str, old: Attribute, new: Attribute) -> list[Change]:
    changes: list[Change] = []
    old_labels = {label.key: label for label in old.labels}
    new_labels = {label.key: label for label in new.labels}
    old_scored = {label.key for label in old.scored_labels}
    new_scored = {label.key for label in new.scored_labels}
    for key, label in new_labels.items():
        if key not in old_labels:
            effect = RESCORE if key in new_scored or old_scored != new_scored or new.hierarchical else NONE
            changes.append(Change("label_added", taxonomy, new.name, key, None, label.name, effect))
    for key, label in old_labels.items():
        if key not in new_labels:
            changes.append(Change("label_removed", taxonomy, new.name, key, label.name, None, RESCORE))
    for key in new_labels.keys() & old_labels.keys():
        before: Label = old_labels[key]
        after: Label = new_labels[key]
        prompts_changed = before.prompt_texts(old.templates) != after.prompt_texts(new.templates)
        scored = key in new_scored or key in old_scored
        if before.name != after.name:
            # A rename keeps the key, so tags keep their rows; it re-scores only when the name is a prompt.
            changes.append(Change("label_renamed", taxonomy, new.name, key, before.name, after.name,
                                  RESCORE if prompts_changed and scored else NONE))
        if before.prompts != after.prompts:  # explicit prompts, or the name/synonyms they default to
            changes.append(Change("prompts_changed", taxonomy, new.name, key, before.prompts, after.prompts,
                                  RESCORE if scored else NONE))
        if before.synonyms != after.synonyms:
            changes.append(Change("synonyms_changed", taxonomy, new.name, key, before.synonyms, after.synonyms,
                                  RESCORE if prompts_changed and scored else NONE))
        if before.translations != after.translations:
            changes.append(Change("translations_changed", taxonomy, new.name, key, before.translations,
                                  after.translations, NONE))
        if before.parent != after.parent:
            changes.append(Change("parent_changed", taxonomy, new.name, key, before.parent, after.parent, RESCORE))
        if before.threshold != after.threshold:
            changes.append(Change("label_threshold_changed", taxonomy, new.name, key, before.threshold,
                                  after.threshold, REDECIDE))
    return changes


def _attribute_changes(old: Attribute, new: Attribute) -> list[Change]:
    t = new.taxonomy
    changes: list[Change] = []

    def add(kind: str, before: Any, after: Any, effect: str) -> None:
        if before != after:
            changes.append(Change(kind, t, new.name, None, before, after, effect))

    add("taxonomy_changed", old.taxonomy, new.taxonomy, RESCORE)
    add("display_name_changed", old.display_name, new.display_name, NONE)
    add("kind_changed", old.kind, new.kind, REDECIDE)
    add("hierarchical_changed", old.hierarchical, new.hierarchical, RESCORE)
    add("threshold_changed", old.threshold, new.threshold, REDECIDE)
    add("top_k_changed", old.top_k, new.top_k, RESCORE)
    add("conditions_changed", dict(old.applies_to), dict(new.applies_to), RESCORE)
    add("templates_changed", old.templates, new.templates, RESCORE)
    changes.extend(_label_changes(t, old, new))
    return changes


def _attributes(taxonomies: Iterable[Taxonomy]) -> dict[str, Attribute]:
    return {a.name: a for t in taxonomies for a in t.attributes}


def diff_taxonomies(old: TaxonomySet | Iterable[Taxonomy] | None, new: TaxonomySet) -> TaxonomyDiff:
    """Changes from ``old`` (the applied taxonomies; ``None`` or missing ones: nothing applied) to ``new``."""
    old_list = list(old.taxonomies if isinstance(old, TaxonomySet) else (old or ()))
    old_attrs = _attributes(old_list)
    new_attrs = {a.name: a for a in new.attributes}
    changes: list[Change] = []
    for name, attribute in new_attrs.items():
        if name not in old_attrs:
            changes.append(Change("attribute_added", attribute.taxonomy, name, None, None, attribute.display_name,
                                  RESCORE))
        else:
            changes.extend(_attribute_changes(old_attrs[name], attribute))
    for name, attribute in old_attrs.items():
        if name not in new_attrs:
            changes.append(Change("attribute_removed", attribute.taxonomy, name, None, attribute.display_name, None,
                                  DROP))

    effect: dict[str, str] = {}
    for change in changes:
        if _STRENGTH[change.effect] > _STRENGTH[effect.get(change.attribute, NONE)]:
            effect[change.attribute] = change.effect
    # Conditions: an attribute whose applies_to names a re-scored attribute may now apply to other products.
    dependants: dict[str, str] = {}
    grew = True
    while grew:
        grew = False
        for attribute in new.attributes:
            if effect.get(attribute.name) == RESCORE:
                continue
            cause = next((c for c in attribute.applies_to if effect.get(c) == RESCORE), None)
            if cause is not None:
                effect[attribute.name] = RESCORE
                dependants[attribute.name] = cause
                grew = True
    order = [a.name for a in new.attributes]
    return TaxonomyDiff(
        changes=tuple(changes),
        old_versions={t.name: t.version for t in old_list},
        new_versions=new.versions,
        rescore=tuple(n for n in order if effect.get(n) == RESCORE),
        redecide=tuple(n for n in order if effect.get(n) == REDECIDE),
        drop=tuple(sorted(n for n, e in effect.items() if e == DROP)),
        dependants=dependants,
    )


def condition_closure(taxonomies: TaxonomySet, attributes: Iterable[str]) -> list[str]:
    """``attributes`` plus every attribute their conditions need (transitively), in scoring order."""
    needed: set[str] = set()
    stack = list(attributes)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        stack.extend(taxonomies.attribute(name).applies_to)
    return [a.name for a in taxonomies.attributes if a.name in needed]


def subset(taxonomies: TaxonomySet, attributes: Iterable[str]) -> TaxonomySet:
    """The taxonomy set restricted to some attributes (order kept); for scoring only a few attributes."""
    wanted = set(attributes)
    kept = []
    for taxonomy in taxonomies.taxonomies:
        attrs = tuple(a for a in taxonomy.attributes if a.name in wanted)
        if attrs:
            kept.append(Taxonomy(taxonomy.name, attrs, taxonomy.source, taxonomy.description))
    return TaxonomySet(tuple(kept))


def affected_products(change: Change, per_attribute: dict[str, int], per_value: dict[tuple[str, str], int],
                      embeddings: int) -> int:
    """How many products a change touches, from tag counts (products with any tag of an attribute, products with
    a given value) and the number of products with embeddings (for attributes no product has tags of yet)."""
    if change.kind in ("attribute_added", "conditions_changed", "hierarchical_changed", "taxonomy_changed"):
        return embeddings
    if change.label is not None and (change.effect in (NONE, REDECIDE) or change.kind == "label_removed"):
        return per_value.get((change.attribute, change.label), 0)
    return per_attribute.get(change.attribute, 0)
