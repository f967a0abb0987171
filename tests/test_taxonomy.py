"""Taxonomy YAML: the shipped files, the hierarchy helpers, matching, versions and every validation error.

Pure: no database. Small YAML files are written into tmp_path; line numbers in the expectations are
counted by hand from the texts below (line 1 = ``taxonomy: ...``).
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from tagger.errors import TaxonomyError
from tagger.settings import REPO_ROOT
from tagger.taxonomy import TaxonomyValidationError, load_taxonomies, validate_taxonomies
from tagger.taxonomy.loader import parse_taxonomy
from tagger.taxonomy.model import DEFAULT_TEMPLATES, Attribute, Label

SHIPPED = REPO_ROOT / "taxonomies"


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_of(directory: Path) -> list[TaxonomyError]:
    taxonomy_set, errors = validate_taxonomies(directory)
    assert errors, "expected validation errors"
    assert taxonomy_set is None
    return errors


def only_error(directory: Path) -> TaxonomyError:
    errors = errors_of(directory)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


@pytest.fixture(scope="module")
def shipped():
    return load_taxonomies(SHIPPED)


# ---- the shipped taxonomies --------------------------------------------------------------------------------


def test_shipped_taxonomies_validate_without_errors():
    taxonomy_set, errors = validate_taxonomies(SHIPPED)
    assert errors == []
    assert taxonomy_set is not None
    assert {t.name for t in taxonomy_set.taxonomies} == {"category", "attributes", "style"}


def test_shipped_attributes_and_their_sources(shipped):
    names = [a.name for a in shipped.attributes]
    assert len(names) == len(set(names))
    for expected in ("category", "colour", "pattern", "sleeve_length", "style", "gender"):
        assert expected in names
    assert shipped.attribute("colour").taxonomy == "attributes"
    assert shipped.taxonomy("category").source == str(SHIPPED / "category.yaml")
    category = shipped.attribute("category")
    assert category.hierarchical and category.kind == "single"
    assert category.threshold == 0.4 and category.top_k == 3
    assert category.templates == ("a photo of {}", "a product photo of {}", "a catalog photo of {}")
    # colour overrides the file's templates with its own
    assert shipped.attribute("colour").templates[1] == "{} colour"
    assert shipped.attribute("sleeve_length").applies_to == {"category": ("topwear", "dresses_group", "kurtas")}
    with pytest.raises(KeyError):
        shipped.attribute("no_such_attribute")


def test_shipped_order_puts_category_before_dependants(shipped):
    order = [t.name for t in shipped.taxonomies]
    # 'attributes' sorts before 'category' by name, but depends on it through applies_to
    assert order.index("category") < order.index("attributes")
    position = {t.name: i for i, t in enumerate(shipped.taxonomies)}
    for attribute in shipped.attributes:
        for condition in attribute.applies_to:
            owner = shipped.attribute(condition).taxonomy
            assert position[owner] <= position[attribute.taxonomy], (attribute.name, condition)


def test_order_of_a_dependent_file_that_sorts_first(tmp_path):
    shutil.copy(SHIPPED / "category.yaml", tmp_path / "category.yaml")
    write(tmp_path, "aaa.yaml", """
        taxonomy: aaa
        attributes:
          sleeve:
            applies_to: {category: [topwear]}
            labels: {short: {}, long: {}}
        """)
    write(tmp_path, "bbb.yaml", """
        taxonomy: bbb
        attributes:
          mood:
            labels: {happy: {}, sad: {}}
        """)
    taxonomy_set = load_taxonomies(tmp_path)
    order = [t.name for t in taxonomy_set.taxonomies]
    assert sorted(order) == ["aaa", "bbb", "category"]
    assert order.index("category") < order.index("aaa")  # by name 'aaa' would come first
    attributes = [a.name for a in taxonomy_set.attributes]
    assert attributes.index("category") < attributes.index("sleeve")


def test_independent_files_are_in_name_order(tmp_path):
    for name in ("zeta", "alpha", "mid"):
        write(tmp_path, f"{name}.yml", f"""
            attributes:
              {name}_attr:
                labels: {{x: {{}}, y: {{}}}}
            """)
    taxonomy_set = load_taxonomies(tmp_path)
    # taxonomy name defaults to the file stem; .yml files are read too
    assert [t.name for t in taxonomy_set.taxonomies] == ["alpha", "mid", "zeta"]


# ---- hierarchy helpers ---------------------------------------------------------------------------------------


def test_ancestors_and_path(shipped):
    category = shipped.attribute("category")
    assert category.ancestors("tshirts") == ["tshirts", "topwear", "apparel"]
    assert category.ancestors("dresses") == ["dresses", "dresses_group", "apparel"]
    assert category.ancestors("sandals") == ["sandals", "footwear"]
    assert category.ancestors("apparel") == ["apparel"]
    assert category.path("tshirts") == "apparel > topwear > tshirts"
    assert category.path("footwear") == "footwear"
    with pytest.raises(KeyError):
        category.ancestors("spaceships")


def test_scored_labels_are_leaves_only(shipped):
    category = shipped.attribute("category")
    scored = {label.key for label in category.scored_labels}
    assert {"tshirts", "jeans", "sandals", "watches", "makeup", "dresses"} <= scored
    assert not scored & {"apparel", "topwear", "bottomwear", "footwear", "accessories", "beauty", "dresses_group"}
    parents = {label.parent for label in category.labels if label.parent}
    assert scored == {label.key for label in category.labels} - parents
    colour = shipped.attribute("colour")
    assert colour.scored_labels == colour.labels  # not hierarchical: every label is scored


def test_scored_labels_of_a_small_hierarchy():
    attribute = Attribute(name="cat", taxonomy="t", hierarchical=True, labels=(
        Label("root", "Root", ("root",)),
        Label("mid", "Mid", ("mid",), parent="root"),
        Label("leaf", "Leaf", ("leaf",), parent="mid"),
        Label("lonely", "Lonely", ("lonely",)),  # a root without children is a leaf
    ))
    assert [label.key for label in attribute.scored_labels] == ["leaf", "lonely"]
    assert attribute.label("mid").parent == "root"


# ---- matching free text ------------------------------------------------------------------------------------


def test_label_matches_key_name_and_synonyms_case_insensitively(shipped):
    tshirts = shipped.attribute("category").label("tshirts")
    for value in ("tshirts", "TSHIRTS", "T-shirts", "  t-SHIRTS ", "tee", "Polo Shirt"):
        assert tshirts.matches(value), value
    for value in ("shirt", "t shirts", "tshirt s", ""):
        assert not tshirts.matches(value), value


def test_match_value_finds_the_label(shipped):
    colour = shipped.attribute("colour")
    assert colour.match_value("Navy Blue").key == "navy"
    assert colour.match_value("dark blue").key == "navy"
    assert colour.match_value("GRAY").key == "grey"
    assert colour.match_value("Off White").key == "white"
    assert colour.match_value("navy").key == "navy"  # key
    assert colour.match_value("Blue").key == "blue"
    assert colour.match_value("tartan") is None
    category = shipped.attribute("category")
    assert category.match_value("Sneakers").key == "casual_shoes"
    assert category.match_value("Topwear").key == "topwear"  # inner labels match too


def test_default_prompts_are_name_and_synonyms(tmp_path):
    path = write(tmp_path, "t.yaml", """
        taxonomy: t
        prompt_templates: ["a photo of {}", "{} on white"]
        attributes:
          colour:
            labels:
              navy: {name: Navy Blue, synonyms: [dark blue]}
              red: {prompts: [bright red clothing]}
        """)
    taxonomy, errors = parse_taxonomy(path)
    assert errors == []
    colour = taxonomy.attributes[0]
    navy, red = colour.labels
    assert navy.prompts == ("navy blue", "dark blue")
    assert red.name == "red" and red.prompts == ("bright red clothing",)
    assert colour.display_name == "Colour"
    assert navy.prompt_texts(colour.templates) == [
        "a photo of navy blue", "navy blue on white", "a photo of dark blue", "dark blue on white"]


def test_default_templates_when_none_given(tmp_path):
    path = write(tmp_path, "t.yaml", """
        attributes:
          colour:
            labels: {red: {}}
        """)
    taxonomy, errors = parse_taxonomy(path)
    assert errors == []
    assert taxonomy.attributes[0].templates == DEFAULT_TEMPLATES


# ---- version ---------------------------------------------------------------------------------------------------

BLOCK = """
taxonomy: shop
attributes:
  colour:
    threshold: 0.4
    labels:
      red:
        name: Red
        prompts: [red clothing]
      blue:
        name: Blue
        prompts: [blue clothing]
"""

FLOW_WITH_COMMENTS = """
# a merchandiser reformatted this file
taxonomy: shop   # same name
attributes:
  colour: {threshold: 0.40, labels: {red: {prompts: ["red clothing"], name: Red},   # reordered keys
                                     blue: {name: 'Blue', prompts: [blue clothing]}}}
"""


def version_of(tmp_path: Path, name: str, text: str) -> str:
    taxonomy, errors = parse_taxonomy(write(tmp_path, name, text))
    assert errors == []
    return taxonomy.version


def test_version_is_a_content_hash(tmp_path):
    block = version_of(tmp_path, "a.yaml", BLOCK)
    assert len(block) == 12 and int(block, 16) >= 0
    assert version_of(tmp_path, "b.yaml", FLOW_WITH_COMMENTS) == block
    assert version_of(tmp_path, "c.yaml", BLOCK.replace("[red clothing]", "[scarlet clothing]")) != block
    assert version_of(tmp_path, "d.yaml", BLOCK.replace("0.4", "0.5")) != block
    assert version_of(tmp_path, "e.yaml", BLOCK.replace("taxonomy: shop", "taxonomy: other")) != block


def test_versions_of_the_shipped_set(shipped):
    again = load_taxonomies(SHIPPED)
    assert again.versions == shipped.versions
    assert set(shipped.versions) == {"category", "attributes", "style"}
    assert len(set(shipped.versions.values())) == 3


# ---- validation errors -----------------------------------------------------------------------------------------


def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, "bad.yaml", """
        taxonomy: shop
        attributes:
          colour:
            kind: single
            - oops
            labels: {red: {}}
        """)
    error = only_error(tmp_path)
    assert error.path == str(path) and error.line == 5
    assert "YAML syntax error" in str(error)
    assert str(error).startswith(f"{path}:5: ")


def test_python_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil.yaml", f"""
        taxonomy: shop
        attributes:
          colour:
            labels:
              red: !!python/object/apply:os.system ["touch {marker}"]
        """)
    error = only_error(tmp_path)
    assert not marker.exists()
    assert error.path == str(path) and error.line == 5
    assert "unsupported YAML tag" in str(error)
    with pytest.raises(TaxonomyValidationError):
        load_taxonomies(tmp_path)
    assert not marker.exists()


def test_python_object_tag_is_refused(tmp_path):
    write(tmp_path, "evil.yaml", """
        taxonomy: shop
        attributes: !!python/object:collections.OrderedDict {}
        """)
    error = only_error(tmp_path)
    assert error.line == 2 and "unsupported YAML tag" in str(error)


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "dup.yaml", """
        taxonomy: shop
        attributes:
          colour:
            labels:
              red: {name: Red}
              blue: {name: Blue}
              red: {name: Crimson}
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 7, "attributes.colour.labels.red")
    assert "duplicate key 'red'" in str(error)


def test_unknown_parent(tmp_path):
    path = write(tmp_path, "cat.yaml", """
        taxonomy: cat
        attributes:
          category:
            hierarchical: true
            labels:
              apparel: {}
              tshirts:
                parent: aparel
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 8, "attributes.category.labels.tshirts.parent")
    assert "unknown parent 'aparel'" in str(error)


def test_parent_cycle(tmp_path):
    path = write(tmp_path, "cat.yaml", """
        taxonomy: cat
        attributes:
          category:
            hierarchical: true
            labels:
              a: {parent: b}
              b: {parent: a}
        """)
    errors = errors_of(tmp_path)
    assert all("own ancestor" in str(e) for e in errors)
    assert {(e.path, e.line, e.key) for e in errors} == {
        (str(path), 6, "attributes.category.labels.a.parent"),
        (str(path), 7, "attributes.category.labels.b.parent"),
    }


def test_label_below_a_cycle_is_not_called_its_own_ancestor(tmp_path):
    write(tmp_path, "cat.yaml", """
        taxonomy: cat
        attributes:
          category:
            hierarchical: true
            labels:
              a: {parent: b}
              b: {parent: a}
              c: {parent: a}
        """)
    keys = {e.key for e in errors_of(tmp_path)}
    assert "attributes.category.labels.a.parent" in keys
    assert "attributes.category.labels.c.parent" not in keys


def test_self_parent_is_a_cycle(tmp_path):
    write(tmp_path, "cat.yaml", """
        taxonomy: cat
        attributes:
          category:
            hierarchical: true
            labels:
              a: {parent: a}
        """)
    error = only_error(tmp_path)
    assert error.key == "attributes.category.labels.a.parent" and "own ancestor" in str(error)


def test_parent_in_a_flat_attribute(tmp_path):
    path = write(tmp_path, "c.yaml", """
        taxonomy: c
        attributes:
          colour:
            labels:
              blue: {}
              navy:
                name: Navy
                parent: blue
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 8, "attributes.colour.labels.navy.parent")
    assert "hierarchical: true" in str(error)


def test_empty_prompts(tmp_path):
    path = write(tmp_path, "c.yaml", """
        taxonomy: c
        attributes:
          colour:
            labels:
              red:
                prompts: []
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 6, "attributes.colour.labels.red.prompts")
    assert "prompts is empty" in str(error)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "high", "true"])
def test_label_threshold_out_of_range(tmp_path, value):
    path = write(tmp_path, "c.yaml", f"""
        taxonomy: c
        attributes:
          colour:
            labels:
              red: {{}}
              blue:
                threshold: {value}
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 7, "attributes.colour.labels.blue.threshold")
    assert "out of range" in str(error) and "threshold" in str(error)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "high"])
def test_attribute_threshold_out_of_range(tmp_path, value):
    path = write(tmp_path, "c.yaml", f"""
        taxonomy: c
        attributes:
          colour:
            threshold: {value}
            labels: {{red: {{}}}}
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 4, "attributes.colour.threshold")
    assert "out of range" in str(error)


def test_threshold_bounds_are_valid(tmp_path):
    write(tmp_path, "c.yaml", """
        taxonomy: c
        attributes:
          colour:
            threshold: 0
            labels: {red: {threshold: 1}, blue: {threshold: 0.5}}
        """)
    colour = load_taxonomies(tmp_path).attribute("colour")
    assert colour.threshold == 0.0
    assert colour.label("red").threshold == 1.0 and colour.label("blue").threshold == 0.5


def _conditional(tmp_path: Path, applies_to: str) -> Path:
    shutil.copy(SHIPPED / "category.yaml", tmp_path / "category.yaml")
    return write(tmp_path, "extra.yaml", f"""
        taxonomy: extra
        attributes:
          sleeve:
            applies_to: {applies_to}
            labels: {{short: {{}}, long: {{}}}}
        """)


def test_applies_to_a_valid_condition(tmp_path):
    _conditional(tmp_path, "{category: [topwear, dresses]}")
    assert load_taxonomies(tmp_path).attribute("sleeve").applies_to == {"category": ("topwear", "dresses")}


def test_applies_to_unknown_attribute(tmp_path):
    path = _conditional(tmp_path, "{categry: [topwear]}")
    error = only_error(tmp_path)
    assert (error.path, error.key) == (str(path), "attributes.sleeve.applies_to.categry")
    assert "unknown attribute 'categry'" in str(error)


def test_applies_to_unknown_label(tmp_path):
    path = _conditional(tmp_path, "{category: [topwear, spaceships]}")
    error = only_error(tmp_path)
    assert (error.path, error.key) == (str(path), "attributes.sleeve.applies_to.category")
    assert "'spaceships'" in str(error) and "not a label of 'category'" in str(error)


def test_applies_to_must_map_to_lists(tmp_path):
    path = _conditional(tmp_path, "{category: topwear}")
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 4, "attributes.sleeve.applies_to")


def test_unknown_key_typo(tmp_path):
    path = write(tmp_path, "c.yaml", """
        taxonomy: c
        attributes:
          colour:
            treshold: 0.4
            labels: {red: {synonym: [scarlet]}}
        """)
    errors = errors_of(tmp_path)
    by_key = {e.key: e for e in errors}
    assert set(by_key) == {"attributes.colour.treshold", "attributes.colour.labels.red.synonym"}
    typo = by_key["attributes.colour.treshold"]
    assert (typo.path, typo.line) == (str(path), 4)
    assert "unknown key 'treshold'" in str(typo) and "threshold" in typo.bare_message
    assert by_key["attributes.colour.labels.red.synonym"].line == 5


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "c.yaml", """
        taxonomy: c
        atributes: {}
        attributes:
          colour: {labels: {red: {}}}
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 2, "atributes")


@pytest.mark.parametrize("key", ["Navy", "navy blue", "_navy"])
def test_invalid_label_key(tmp_path, key):
    path = write(tmp_path, "c.yaml", f"""
        taxonomy: c
        attributes:
          colour:
            labels:
              red: {{}}
              "{key}": {{}}
        """)
    error = only_error(tmp_path)
    assert (error.path, error.line, error.key) == (str(path), 6, f"attributes.colour.labels.{key}")
    assert f"label key {key!r}" in str(error)


def test_attribute_defined_in_two_files(tmp_path):
    first = write(tmp_path, "a.yaml", """
        taxonomy: a
        attributes:
          colour: {labels: {red: {}}}
        """)
    second = write(tmp_path, "b.yaml", """
        taxonomy: b
        attributes:
          colour: {labels: {blue: {}}}
        """)
    error = only_error(tmp_path)
    assert (error.path, error.key) == (str(second), "attributes.colour")
    assert f"also defined in {first}" in str(error)


# The loader promises "every error names file, line and key", the set-level checks (across files) too.
@pytest.mark.parametrize("applies_to", ["{categry: [topwear]}", "{category: [spaceships]}"])
def test_applies_to_errors_name_the_line(tmp_path, applies_to):
    _conditional(tmp_path, applies_to)
    assert only_error(tmp_path).line == 4


def test_duplicate_attribute_error_names_the_line(tmp_path):
    write(tmp_path, "a.yaml", "taxonomy: a\nattributes:\n  colour: {labels: {red: {}}}\n")
    write(tmp_path, "b.yaml", "taxonomy: b\nattributes:\n  colour: {labels: {blue: {}}}\n")
    assert only_error(tmp_path).line == 3


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    error = only_error(missing)
    assert "does not exist" in str(error) and "TAGGER_TAXONOMY_DIR" in str(error)
    with pytest.raises(TaxonomyValidationError) as info:
        load_taxonomies(missing)
    assert len(info.value.errors) == 1


def test_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a taxonomy")
    error = only_error(tmp_path)
    assert "no *.yaml files" in str(error)


def test_all_errors_of_all_files_are_reported(tmp_path):
    write(tmp_path, "a.yaml", """
        taxonomy: a
        attributes:
          colour:
            labels: {Red: {}}
        """)
    write(tmp_path, "b.yaml", """
        taxonomy: b
        attributes:
          size:
            threshold: 2
            labels: {small: {}}
        """)
    with pytest.raises(TaxonomyValidationError) as info:
        load_taxonomies(tmp_path)
    assert sorted(Path(e.path).name for e in info.value.errors) == ["a.yaml", "b.yaml"]
    message = str(info.value)
    assert "a.yaml:4" in message and "b.yaml:4" in message
