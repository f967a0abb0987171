"""Reading and validating taxonomy YAML. Safe loading only; every error names file, line and key.

Schema (see ``taxonomies/README.md`` for the merchandiser's version)::

    taxonomy: attributes            # name of this taxonomy (defaults to the file name)
    prompt_templates: ["a photo of {}"]   # optional; "{}" receives each prompt text
    attributes:
      colour:                       # attribute name, unique across all taxonomies
        name: Colour
        kind: single                # single | multi
        hierarchical: false         # true: labels form a tree via `parent`; leaves are scored
        threshold: 0.4              # under it the tag is stored as needs_review
        top_k: 3
        applies_to: {category: [topwear, dresses]}   # only for products whose category is (under) one of these
        labels:
          navy:                     # stable key; rename via `name`
            name: Navy
            prompts: [navy blue clothing]            # default: name + synonyms
            synonyms: [navy blue, dark blue]
            threshold: 0.5
            translations: {fr: Marine, de: Marineblau}
          coastal: {exemplar_only: true}  # no prompts: learnt from its exemplars alone (tagger exemplars)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tagger.errors import TaxonomyError
from tagger.taxonomy.model import DEFAULT_TEMPLATES, Attribute, Label, Taxonomy, TaxonomySet

KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
TOP_KEYS = {"taxonomy", "description", "prompt_templates", "attributes"}
ATTRIBUTE_KEYS = {"name", "kind", "hierarchical", "threshold", "top_k", "applies_to", "labels", "prompt_templates",
                  "description"}
LABEL_KEYS = {"name", "prompts", "synonyms", "parent", "threshold", "translations", "description", "exemplar_only"}


class TaxonomyValidationError(TaxonomyError):
    """One or more problems in the taxonomy files; ``errors`` lists each with file, line and key."""

    def __init__(self, errors: list[TaxonomyError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors) if errors else "invalid taxonomy")


class _Lines:
    """Line numbers of every key path in one YAML document, from PyYAML's node tree."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines: dict[tuple[str, ...], int] = {}
        self.duplicates: list[TaxonomyError] = []
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                if key in seen:
                    self.duplicates.append(TaxonomyError(
                        f"duplicate key {key!r}: each key may appear once here; merge or rename one of them",
                        path=self.path, line=key_node.start_mark.line + 1, key=".".join(prefix + (key,))))
                seen.add(key)
                self.lines[prefix + (key,)] = key_node.start_mark.line + 1
                self._walk(value_node, prefix + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[prefix + (str(index),)] = item.start_mark.line + 1
                self._walk(item, prefix + (str(index),))

    def line(self, *keys: str) -> int | None:
        path = tuple(keys)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


class _FileParser:
    def __init__(self, path: Path, text: str):
        self.path = str(path)
        self.file_stem = path.stem
        self.text = text
        self.errors: list[TaxonomyError] = []

    def error(self, message: str, *keys: str) -> None:
        self.errors.append(TaxonomyError(message, path=self.path, line=self.lines.line(*keys), key=".".join(keys) or None))

    def parse(self) -> Taxonomy | None:
        try:
            data = yaml.safe_load(self.text)
            self.lines = _Lines(self.path, self.text)
        except yaml.constructor.ConstructorError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else None
            self.errors.append(TaxonomyError(
                f"unsupported YAML tag ({exc.problem}); taxonomies are plain YAML: remove the '!' tag",
                path=self.path, line=line))
            return None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            self.errors.append(TaxonomyError(f"YAML syntax error: {problem}; check indentation and quoting",
                                             path=self.path, line=mark.line + 1 if mark else None))
            return None
        self.errors.extend(self.lines.duplicates)
        if not isinstance(data, dict):
            self.error("the file must be a mapping with 'taxonomy' and 'attributes' keys")
            return None
        for key in sorted(set(data) - TOP_KEYS):
            self.error(f"unknown key {key!r}; allowed here: {', '.join(sorted(TOP_KEYS))}", str(key))
        name = str(data.get("taxonomy") or self.file_stem)
        if not KEY_PATTERN.match(name):
            self.error(f"taxonomy name {name!r} must be lower-case letters, digits, '_' or '-'", "taxonomy")
        templates = self._templates(data.get("prompt_templates"), ("prompt_templates",)) or DEFAULT_TEMPLATES
        raw_attributes = data.get("attributes")
        if not isinstance(raw_attributes, dict) or not raw_attributes:
            self.error("'attributes' must be a non-empty mapping of attribute name to its definition", "attributes")
            return None
        attributes = [self._attribute(name, str(attr_name), spec, templates)
                      for attr_name, spec in raw_attributes.items()]
        return Taxonomy(name=name, attributes=tuple(a for a in attributes if a is not None), source=self.path,
                        description=str(data.get("description") or ""))

    def _templates(self, raw: Any, keys: tuple[str, ...]) -> tuple[str, ...] | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or not raw or not all(isinstance(t, str) and "{}" in t for t in raw):
            self.error("prompt_templates must be a non-empty list of texts, each containing '{}'", *keys)
            return None
        return tuple(raw)

    def _threshold(self, raw: Any, keys: tuple[str, ...]) -> float | None:
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0.0 <= float(raw) <= 1.0:
            self.error(f"threshold {raw!r} is out of range: use a number from 0 to 1", *keys)
            return None
        return float(raw)

    def _attribute(self, taxonomy: str, name: str, spec: Any, templates: tuple[str, ...]) -> Attribute | None:
        at = ("attributes", name)
        if not KEY_PATTERN.match(name):
            self.error(f"attribute name {name!r} must be lower-case letters, digits, '_' or '-'", *at)
        if not isinstance(spec, dict):
            self.error("an attribute must be a mapping with at least 'labels'", *at)
            return None
        for key in sorted(set(spec) - ATTRIBUTE_KEYS):
            self.error(f"unknown key {key!r}; allowed here: {', '.join(sorted(ATTRIBUTE_KEYS))}", *at, str(key))
        kind = spec.get("kind", "single")
        if kind not in ("single", "multi"):
            self.error(f"kind {kind!r} is not known: use 'single' (one label per product) or 'multi'", *at, "kind")
        top_k = spec.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            self.error(f"top_k {top_k!r} must be a whole number of at least 1", *at, "top_k")
            top_k = None
        applies_to: dict[str, tuple[str, ...]] = {}
        raw_applies = spec.get("applies_to")
        if raw_applies is not None:
            if not isinstance(raw_applies, dict) or not all(isinstance(v, list) and v for v in raw_applies.values()):
                self.error("applies_to must map an attribute name to a non-empty list of its label keys, "
                           "e.g. {category: [topwear, dresses]}", *at, "applies_to")
            else:
                applies_to = {str(k): tuple(str(x) for x in v) for k, v in raw_applies.items()}
        raw_labels = spec.get("labels")
        if not isinstance(raw_labels, dict) or not raw_labels:
            self.error("'labels' must be a non-empty mapping of label key to its definition", *at, "labels")
            return None
        labels = [self._label(at, str(key), value) for key, value in raw_labels.items()]
        hierarchical = bool(spec.get("hierarchical", False))
        attribute = Attribute(
            name=name, taxonomy=taxonomy, labels=tuple(label for label in labels if label is not None),
            display_name=str(spec.get("name") or name.replace("_", " ").title()), kind=kind,
            hierarchical=hierarchical, threshold=self._threshold(spec.get("threshold"), at + ("threshold",)),
            top_k=top_k, applies_to=applies_to,
            templates=self._templates(spec.get("prompt_templates"), at + ("prompt_templates",)) or templates,
        )
        self._check_hierarchy(attribute, at)
        return attribute

    def _label(self, at: tuple[str, ...], key: str, spec: Any) -> Label | None:
        where = at + ("labels", key)
        if not KEY_PATTERN.match(key):
            self.error(f"label key {key!r} must be lower-case letters, digits, '_' or '-' (it is the stable id; "
                       "put the shown text in 'name')", *where)
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            self.error("a label must be a mapping (name, prompts, synonyms, ...)", *where)
            return None
        for extra in sorted(set(spec) - LABEL_KEYS):
            self.error(f"unknown key {extra!r}; allowed here: {', '.join(sorted(LABEL_KEYS))}", *where, str(extra))
        name = str(spec.get("name") or key.replace("_", " ").replace("-", " "))
        synonyms = self._texts(spec.get("synonyms"), where + ("synonyms",))
        prompts = self._texts(spec.get("prompts"), where + ("prompts",))
        if "prompts" in spec and not prompts:
            self.error("prompts is empty: give at least one text describing this label, or remove the key to use "
                       "its name and synonyms", *where, "prompts")
        translations = spec.get("translations") or {}
        if not isinstance(translations, dict) or not all(isinstance(v, str) for v in translations.values()):
            self.error("translations must map a language code to a display name, e.g. {fr: Robe}", *where,
                       "translations")
            translations = {}
        parent = spec.get("parent")
        exemplar_only = spec.get("exemplar_only", False)
        if not isinstance(exemplar_only, bool):
            self.error(f"exemplar_only {exemplar_only!r} must be true or false", *where, "exemplar_only")
            exemplar_only = False
        if exemplar_only and "prompts" in spec:
            self.error("an exemplar_only label is learnt from its exemplars alone: remove 'prompts', or remove "
                       "'exemplar_only' to score it from its prompts", *where, "exemplar_only")
        return Label(key=key, name=name,
                     prompts=() if exemplar_only else tuple(prompts or [name.lower(), *synonyms]),
                     synonyms=tuple(synonyms), parent=str(parent) if parent is not None else None,
                     threshold=self._threshold(spec.get("threshold"), where + ("threshold",)),
                     translations={str(k): v for k, v in translations.items()}, exemplar_only=bool(exemplar_only))

    def _texts(self, raw: Any, keys: tuple[str, ...]) -> list[str]:
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(t, str) and t.strip() for t in raw):
            self.error("expected a list of non-empty texts", *keys)
            return []
        return [t.strip() for t in raw]

    def _check_hierarchy(self, attribute: Attribute, at: tuple[str, ...]) -> None:
        keys = {label.key for label in attribute.labels}
        for label in attribute.labels:
            if label.parent is None:
                continue
            where = at + ("labels", label.key, "parent")
            if not attribute.hierarchical:
                self.error("'parent' is only allowed in an attribute with 'hierarchical: true'", *where)
            elif label.parent not in keys:
                self.error(f"unknown parent {label.parent!r}: it must be the key of another label of this attribute",
                           *where)
            elif self._in_cycle(attribute, label.key, keys):
                self.error(f"label {label.key!r} is its own ancestor: break the parent cycle", *where)

    @staticmethod
    def _in_cycle(attribute: Attribute, key: str, keys: set[str]) -> bool:
        """Whether following parents from ``key`` comes back to ``key`` (labels below a cycle are not in it)."""
        seen: set[str] = set()
        current = attribute.label(key).parent
        while current is not None and current in keys and current not in seen:
            if current == key:
                return True
            seen.add(current)
            current = attribute.label(current).parent
        return False


def parse_taxonomy(path: Path, text: str | None = None) -> tuple[Taxonomy | None, list[TaxonomyError]]:
    parser = _FileParser(path, path.read_text(encoding="utf-8") if text is None else text)
    taxonomy = parser.parse()
    return taxonomy, parser.errors


def _line_of(source: str, key: str) -> int | None:
    """The line of a dotted key path in a taxonomy file (for errors found across files)."""
    try:
        return _Lines(source, Path(source).read_text(encoding="utf-8")).line(*key.split("."))
    except (OSError, yaml.YAMLError):
        return None


def _set_error(message: str, taxonomy: Taxonomy, key: str) -> TaxonomyError:
    return TaxonomyError(message, path=taxonomy.source, line=_line_of(taxonomy.source, key), key=key)


def _check_set(taxonomies: list[Taxonomy]) -> list[TaxonomyError]:
    errors: list[TaxonomyError] = []
    owners: dict[str, Taxonomy] = {}
    names: dict[str, Taxonomy] = {}
    for taxonomy in taxonomies:
        if taxonomy.name in names:
            errors.append(_set_error(f"taxonomy name {taxonomy.name!r} is also used by {names[taxonomy.name].source}",
                                     taxonomy, "taxonomy"))
        names[taxonomy.name] = taxonomy
        for attribute in taxonomy.attributes:
            if attribute.name in owners:
                errors.append(_set_error(
                    f"attribute {attribute.name!r} is also defined in {owners[attribute.name].source}; attribute names "
                    "must be unique across taxonomies", taxonomy, f"attributes.{attribute.name}"))
            owners[attribute.name] = taxonomy
    attributes = {a.name: a for t in taxonomies for a in t.attributes}
    for taxonomy in taxonomies:
        for attribute in taxonomy.attributes:
            for condition, keys in attribute.applies_to.items():
                where = f"attributes.{attribute.name}.applies_to.{condition}"
                target = attributes.get(condition)
                if target is None:
                    errors.append(_set_error(f"condition names the unknown attribute {condition!r}; use the name of "
                                             "a single-label attribute of any taxonomy", taxonomy, where))
                    continue
                if target.kind != "single":
                    errors.append(_set_error(f"conditions may only refer to single-label attributes; "
                                             f"{condition!r} is multi-label", taxonomy, where))
                known = {label.key for label in target.labels}
                for key in keys:
                    if key not in known:
                        errors.append(_set_error(
                            f"condition names {key!r}, which is not a label of {condition!r} "
                            f"(in {target.taxonomy}); use one of its label keys", taxonomy, where))
    return errors


def _ordered(taxonomies: list[Taxonomy]) -> list[Taxonomy]:
    """Taxonomies whose attributes are conditions of others come first, so conditions are scored before use."""
    owner = {a.name: t.name for t in taxonomies for a in t.attributes}
    depends = {t.name: {owner[c] for a in t.attributes for c in a.applies_to if c in owner} - {t.name}
               for t in taxonomies}
    ordered: list[Taxonomy] = []
    remaining = sorted(taxonomies, key=lambda t: t.name)
    while remaining:
        ready = [t for t in remaining if depends[t.name] <= {o.name for o in ordered}] or remaining[:1]
        ordered.append(ready[0])
        remaining.remove(ready[0])
    return ordered


def validate_taxonomies(directory: Path) -> tuple[TaxonomySet | None, list[TaxonomyError]]:
    """Parse every ``*.yaml``/``*.yml`` in ``directory``; returns the set (if valid) and all errors found."""
    if not directory.is_dir():
        return None, [TaxonomyError(f"taxonomy directory {directory} does not exist; set TAGGER_TAXONOMY_DIR")]
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not files:
        return None, [TaxonomyError(f"no *.yaml files in {directory}; add at least one taxonomy")]
    taxonomies: list[Taxonomy] = []
    errors: list[TaxonomyError] = []
    for path in files:
        taxonomy, file_errors = parse_taxonomy(path)
        errors.extend(file_errors)
        if taxonomy is not None:
            taxonomies.append(taxonomy)
    errors.extend(_check_set(taxonomies))
    if errors:
        return None, errors
    return TaxonomySet(tuple(_ordered(taxonomies))), []


def load_taxonomies(directory: Path) -> TaxonomySet:
    """The valid taxonomy set in ``directory``, or ``TaxonomyValidationError`` listing every problem."""
    taxonomy_set, errors = validate_taxonomies(directory)
    if errors or taxonomy_set is None:
        raise TaxonomyValidationError(errors)
    return taxonomy_set
