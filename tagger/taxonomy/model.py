"""Taxonomies as plain, immutable data. No I/O here: see ``loader`` for YAML."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {}", "a product photo of {}")


@dataclass(frozen=True)
class Label:
    key: str  # stable identifier: a rename changes `name`, never `key`
    name: str
    prompts: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    parent: str | None = None
    threshold: float | None = None
    translations: dict[str, str] = field(default_factory=dict)
    exemplar_only: bool = False  # no prompts: scored from its exemplars alone (a house style)

    def prompt_texts(self, templates: tuple[str, ...]) -> list[str]:
        """The texts embedded and averaged for this label (prompt ensembling)."""
        return [template.replace("{}", prompt) for prompt in self.prompts for template in templates]

    def matches(self, value: str) -> bool:
        """Whether a free-text value (e.g. a PIM attribute) names this label."""
        wanted = value.strip().lower()
        return wanted in {self.key.lower(), self.name.lower(), *(s.lower() for s in self.synonyms)}


@dataclass(frozen=True)
class Attribute:
    name: str
    taxonomy: str
    labels: tuple[Label, ...]
    display_name: str = ""
    kind: str = "single"  # single | multi
    hierarchical: bool = False
    threshold: float | None = None
    top_k: int | None = None
    applies_to: dict[str, tuple[str, ...]] = field(default_factory=dict)  # attribute -> label keys (any ancestor)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def label(self, key: str) -> Label:
        for label in self.labels:
            if label.key == key:
                return label
        raise KeyError(key)

    @property
    def scored_labels(self) -> tuple[Label, ...]:
        """Labels that get a score: in a hierarchy only leaves (parents are implied by a leaf)."""
        if not self.hierarchical:
            return self.labels
        parents = {label.parent for label in self.labels if label.parent}
        return tuple(label for label in self.labels if label.key not in parents)

    def ancestors(self, key: str) -> list[str]:
        """Keys from the label itself up to its root."""
        chain: list[str] = []
        current: str | None = key
        while current is not None and current not in chain:
            chain.append(current)
            current = self.label(current).parent
        return chain

    def path(self, key: str) -> str:
        return " > ".join(reversed(self.ancestors(key)))

    def match_value(self, value: str) -> Label | None:
        for label in self.labels:
            if label.matches(value):
                return label
        return None


@dataclass(frozen=True)
class Taxonomy:
    name: str
    attributes: tuple[Attribute, ...]
    source: str = ""  # file it was read from, for messages
    description: str = ""

    @cached_property  # hashing walks every label; the worker asks for it on every write
    def version(self) -> str:
        """Content hash: equal taxonomies have equal versions whatever their file formatting."""
        payload = json.dumps([_hashable(a) for a in self.attributes], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(f"{self.name}\n{payload}".encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description, "attributes": [asdict(a) for a in self.attributes]}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "") -> Taxonomy:
        """The inverse of ``to_json`` (a version stored in ``taxonomy_versions.content``); same ``version``."""
        attributes = []
        for raw in data["attributes"]:
            labels = tuple(
                Label(key=lab["key"], name=lab["name"], prompts=tuple(lab["prompts"]),
                      synonyms=tuple(lab.get("synonyms") or ()), parent=lab.get("parent"),
                      threshold=lab.get("threshold"), translations=dict(lab.get("translations") or {}),
                      exemplar_only=bool(lab.get("exemplar_only", False)))
                for lab in raw["labels"]
            )
            attributes.append(Attribute(
                name=raw["name"], taxonomy=raw["taxonomy"], labels=labels, display_name=raw.get("display_name", ""),
                kind=raw.get("kind", "single"), hierarchical=bool(raw.get("hierarchical", False)),
                threshold=raw.get("threshold"), top_k=raw.get("top_k"),
                applies_to={str(k): tuple(v) for k, v in (raw.get("applies_to") or {}).items()},
                templates=tuple(raw.get("templates") or DEFAULT_TEMPLATES),
            ))
        return cls(name=str(data["name"]), attributes=tuple(attributes), source=source,
                   description=str(data.get("description") or ""))


def _hashable(attribute: Attribute) -> dict[str, Any]:
    """An attribute as hashed into its taxonomy's version. ``exemplar_only`` is left out where it is false, so
    the versions of taxonomies written before the key existed stay what they were."""
    data = asdict(attribute)
    for label in data["labels"]:
        if not label.get("exemplar_only"):
            label.pop("exemplar_only", None)
    return data


@dataclass(frozen=True)
class TaxonomySet:
    """All taxonomies of a deployment, in the order attributes must be scored (conditions refer backwards)."""

    taxonomies: tuple[Taxonomy, ...]

    @property
    def attributes(self) -> list[Attribute]:
        return [attribute for taxonomy in self.taxonomies for attribute in taxonomy.attributes]

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(name)

    def taxonomy(self, name: str) -> Taxonomy:
        for taxonomy in self.taxonomies:
            if taxonomy.name == name:
                return taxonomy
        raise KeyError(name)

    @property
    def versions(self) -> dict[str, str]:
        return {taxonomy.name: taxonomy.version for taxonomy in self.taxonomies}
