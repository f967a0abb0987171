"""Exemplars against the real Postgres+pgvector: import (all or nothing, --skip-bad), cascade on product delete,
re-tag from stored embeddings and features, manual tags untouched, contradictions, exemplar-only labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from tagger import cli
from tagger.db import exemplar_repository as exrepo
from tagger.db import repository as repo
from tagger.db.engine import get_engine
from tagger.encoders.base import get_encoder
from tagger.exemplars.commands import import_file, retag_attributes
from tagger.exemplars.validate import ExemplarImportError
from tagger.scoring import LabelPrototypes
from tagger.settings import REPO_ROOT, Settings
from tagger.taxonomy import load_taxonomies
from tests.conftest import query_rows, query_value

MODEL_ID = get_encoder("default", "cpu").model_id  # read from the model's config; nothing is loaded
N = 40
FEATURE_DIM = 8


def _settings(url: str, tmp_path: Path, taxonomy_dir: Path = REPO_ROOT / "taxonomies") -> Settings:
    return Settings(database_url=url, broker_url="redis://unused", taxonomy_dir=taxonomy_dir,
                    data_dir=tmp_path / "data")


def _cluster(i: int) -> str:
    return "formal" if i % 2 == 0 else "sporty"


def _features(i: int, rng: np.random.Generator) -> np.ndarray:
    # Post-ReLU-like features: a common offset plus a cluster direction per true style.
    base = np.full(FEATURE_DIM, 3.0)
    base[0 if _cluster(i) == "formal" else 1] += 2.0
    return (base + rng.normal(0, 0.1, FEATURE_DIM)).astype(np.float32)


def _load_world(url: str, taxonomy_dir: Path = REPO_ROOT / "taxonomies") -> None:
    """N products with random unit embeddings; all but the last have stored features; synthetic label prototypes
    for every attribute, stored as the pipeline stores them (so re-tagging encodes no prompt)."""
    rng = np.random.default_rng(0)
    taxonomies = load_taxonomies(taxonomy_dir)
    with get_engine(url).begin() as conn:
        for i in range(N):
            sku = f"SKU-{i:03d}"
            conn.execute(text("INSERT INTO products (sku, title) VALUES (:s, :t)"), {"s": sku, "t": f"product {i}"})
            image = rng.normal(size=512).astype(np.float32)
            features = None if i == N - 1 else str(_features(i, rng).tolist())
            conn.execute(text(
                "INSERT INTO embeddings (sku, model_id, image_embedding, image_hash, text_hash, image_features) "
                "VALUES (:s, :m, :e, 'h', 't', CAST(:f AS halfvec))"),
                {"s": sku, "m": MODEL_ID, "e": image / np.linalg.norm(image), "f": features})
        for taxonomy in taxonomies.taxonomies:
            prototypes = {}
            for attribute in taxonomy.attributes:
                keys = tuple(label.key for label in attribute.scored_labels)
                vectors = rng.normal(size=(len(keys), 512)).astype(np.float32)
                prototypes[attribute.name] = LabelPrototypes(
                    attribute.name, keys, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
            repo.store_prototypes(conn, MODEL_ID, taxonomy, prototypes)


def _tags(url: str, attribute: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    rows = query_rows(url, "SELECT sku, value, score, rank, status, source, exemplars, updated_at FROM tags "
                           "WHERE attribute = :a", a=attribute)
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def _top(url: str, attribute: str) -> dict[str, tuple[str, int]]:
    rows = query_rows(url, "SELECT sku, value, exemplars FROM tags WHERE attribute = :a AND rank = 1 "
                           "AND source = 'machine'", a=attribute)
    return {r[0]: (r[1], r[2]) for r in rows}


def _csv(tmp_path: Path, lines: list[str], name: str = "exemplars.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(["sku,attribute,label", *lines]) + "\n", encoding="utf-8")
    return path


GOOD = [f"SKU-{i:03d},style,{_cluster(i)}" for i in range(12)]  # 6 per label: enough to fit the scale


@pytest.fixture
def world(clean_db: str, tmp_path: Path) -> tuple[str, Settings]:
    _load_world(clean_db)
    settings = _settings(clean_db, tmp_path)
    engine = get_engine(clean_db)
    taxonomies = load_taxonomies(settings.taxonomy_dir)
    retag_attributes(engine, settings, taxonomies, ["style", "colour"])  # zero-shot baseline
    return clean_db, settings


def test_import_with_bad_rows_imports_nothing_and_reports_each(world: tuple[str, Settings], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = world
    path = _csv(tmp_path, [*GOOD, "NOPE-1,style,formal", "SKU-001,flavour,sweet", "SKU-002,style,grunge",
                           f"SKU-{N - 1:03d},style,casual", "SKU-003,category,topwear"])
    before = _tags(url, "style")
    assert cli.main(["exemplars", "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:14: unknown SKU 'NOPE-1'" in err
    assert f"{path}:15: unknown attribute 'flavour'" in err
    assert f"{path}:16: unknown label 'grunge' for attribute 'style'" in err
    assert f"{path}:17: SKU 'SKU-{N - 1:03d}' has no stored image features" in err
    assert f"{path}:18: label 'topwear' of 'category' groups other labels" in err
    assert "5 bad row(s)" in err and "nothing was imported" in err
    assert query_value(url, "SELECT count(*) FROM exemplars") == 0
    assert _tags(url, "style") == before  # no re-tag either

    engine = get_engine(url)
    taxonomies = load_taxonomies(REPO_ROOT / "taxonomies")
    with pytest.raises(ExemplarImportError) as caught:
        import_file(engine, taxonomies, MODEL_ID, path, skip_bad=False, created_by="test")
    assert [p.line for p in caught.value.problems] == [14, 15, 16, 17, 18]


def test_skip_bad_imports_the_good_rows_and_retags(world: tuple[str, Settings], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = world
    path = _csv(tmp_path, [*GOOD, "NOPE-1,style,formal", "SKU-002,style,grunge"])
    assert cli.main(["exemplars", "import", str(path), "--skip-bad", "--created-by", "merch@shop"]) == 0
    out = capsys.readouterr()
    assert "imported 12 new exemplar(s) from 12 good row(s); 2 bad row(s) skipped" in out.out
    assert "re-tagged style for 40 product(s)" in out.out
    assert f"skipped {path}:14: unknown SKU 'NOPE-1'" in out.err
    rows = query_rows(url, "SELECT sku, taxonomy, attribute, label, source, created_by FROM exemplars ORDER BY sku")
    assert [tuple(r) for r in rows] == [(f"SKU-{i:03d}", "style", "style", _cluster(i), "import", "merch@shop")
                                        for i in range(12)]
    # Importing the same file again adds nothing (idempotent) and re-tags nothing.
    assert cli.main(["exemplars", "import", str(path), "--skip-bad"]) == 0
    assert "imported 0 new exemplar(s)" in capsys.readouterr().out


def test_retag_after_import_changes_that_attribute_only(world: tuple[str, Settings], tmp_path: Path) -> None:
    url, settings = world
    engine = get_engine(url)
    taxonomies = load_taxonomies(settings.taxonomy_dir)
    # A person's tag on one product, and its stored zero-shot tags of other attributes.
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM tags WHERE sku = 'SKU-010' AND attribute = 'style'"))
        conn.execute(text("INSERT INTO tags (sku, taxonomy, attribute, value, score, rank, source, status) "
                          "VALUES ('SKU-010', 'style', 'style', 'party', 1, 1, 'manual', 'approved')"))
    colour_before = _tags(url, "colour")
    style_before = _top(url, "style")
    manual_before = query_rows(url, "SELECT * FROM tags WHERE sku = 'SKU-010' AND source = 'manual'")
    assert all(n == 0 for _, n in style_before.values())

    import_file(engine, taxonomies, MODEL_ID, _csv(tmp_path, GOOD), skip_bad=False, created_by=None)
    result = retag_attributes(engine, settings, taxonomies, ["style"])
    assert result.products == N and result.rows_written > 0

    after = _top(url, "style")
    for i in range(N - 1):
        sku = f"SKU-{i:03d}"
        if sku == "SKU-010":
            continue
        assert after[sku] == (_cluster(i), 12), sku  # exemplars decided it, and the tag says so
    # No stored features: zero-shot as before, and the tag records that exemplars did not contribute.
    last = f"SKU-{N - 1:03d}"
    assert after[last] == style_before[last] and after[last][1] == 0
    assert _tags(url, "colour") == colour_before  # other attributes untouched, not even rewritten
    assert query_rows(url, "SELECT * FROM tags WHERE sku = 'SKU-010' AND source = 'manual'") == manual_before
    # Re-running rewrites nothing.
    assert retag_attributes(engine, settings, taxonomies, ["style"]).rows_written == 0

    # Removing the exemplars of a label re-tags without them.
    assert cli.main(["exemplars", "remove", "--attribute", "style", "--label", "sporty"]) == 0
    counts = {n for _, n in _top(url, "style").values()}
    assert counts == {0, 6}


def test_exemplars_go_with_their_product(world: tuple[str, Settings]) -> None:
    url, _ = world
    engine = get_engine(url)
    with engine.begin() as conn:
        assert exrepo.add_exemplar(conn, sku="SKU-004", attribute="style", label="formal",
                                   source="review_approval", created_by="ana")
        assert not exrepo.add_exemplar(conn, sku="SKU-004", attribute="style", label="formal",
                                       source="review_approval", created_by="ana")  # idempotent
        assert exrepo.add_exemplar(conn, sku="SKU-005", attribute="style", label="sporty",
                                   source="review_correction", created_by="ana")
    assert query_value(url, "SELECT taxonomy FROM exemplars WHERE sku = 'SKU-004'") == "style"
    with engine.begin() as conn:
        assert repo.delete_product(conn, "SKU-004")
    assert [r[0] for r in query_rows(url, "SELECT sku FROM exemplars")] == ["SKU-005"]
    with engine.connect() as conn:
        loaded = exrepo.load_exemplars(conn, MODEL_ID)
    assert loaded["style"].labels == ("sporty",) and loaded["style"].features.shape == (1, FEATURE_DIM)
    with pytest.raises(Exception, match="source"):
        with engine.begin() as conn:
            exrepo.add_exemplar(conn, sku="SKU-006", attribute="style", label="formal", source="guess",
                                created_by=None)


def test_check_reports_contradictions(world: tuple[str, Settings], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = world
    engine = get_engine(url)
    with engine.begin() as conn:
        rows = [(f"SKU-{i:03d}", "style", "style", _cluster(i)) for i in range(8)]
        rows += [("SKU-001", "style", "style", "formal"),  # SKU-001 is sporty-looking: two labels, and misplaced
                 ("SKU-009", "style", "style", "formal")]  # sporty-looking product labelled formal
        exrepo.add_exemplars(conn, rows, source="import", created_by=None)
    assert cli.main(["exemplars", "check"]) == 1
    out = capsys.readouterr().out
    assert "two_labels" in out and "SKU-001 is an exemplar of both formal and sporty" in out
    assert "SKU-009 (style=formal) looks more like the exemplars of 'sporty'" in out
    assert "SKU-002" not in out
    assert "10 exemplar(s) checked" in out

    assert cli.main(["exemplars", "list", "--attribute", "style", "--label", "sporty"]) == 0
    listed = capsys.readouterr().out
    assert "SKU-001" in listed and "SKU-002" not in listed


def test_exemplar_only_label(clean_db: str, tmp_path: Path) -> None:
    tax_dir = tmp_path / "taxonomies"
    tax_dir.mkdir()
    for path in (REPO_ROOT / "taxonomies").glob("*.yaml"):
        content = path.read_text(encoding="utf-8")
        if path.name == "style.yaml":
            content = content.replace("    labels:\n", "    labels:\n      coastal: {name: Coastal, exemplar_only: true}\n",
                                      1)
        (tax_dir / path.name).write_text(content, encoding="utf-8")
    _load_world(clean_db, tax_dir)
    settings = _settings(clean_db, tmp_path, tax_dir)
    engine = get_engine(clean_db)
    taxonomies = load_taxonomies(tax_dir)
    assert taxonomies.attribute("style").label("coastal").prompts == ()
    retag_attributes(engine, settings, taxonomies, ["style"])
    assert query_value(clean_db, "SELECT count(*) FROM tags WHERE value = 'coastal' AND score > 0") == 0
    rows = [f"SKU-{i:03d},style,{'coastal' if i % 2 == 0 else 'sporty'}" for i in range(12)]
    import_file(engine, taxonomies, MODEL_ID, _csv(tmp_path, rows), skip_bad=False, created_by=None)
    retag_attributes(engine, settings, taxonomies, ["style"])
    top = _top(clean_db, "style")
    assert top["SKU-020"] == ("coastal", 12) and top["SKU-021"] == ("sporty", 12)


def test_exemplar_only_needs_no_prompts(tmp_path: Path) -> None:
    from tagger.taxonomy.loader import validate_taxonomies

    (tmp_path / "style.yaml").write_text(
        "taxonomy: style\nattributes:\n  style:\n    labels:\n      casual: {}\n"
        "      coastal: {exemplar_only: true, prompts: [beach]}\n      boho: {exemplar_only: 'yes'}\n")
    _, errors = validate_taxonomies(tmp_path)
    messages = [str(e) for e in errors]
    assert any("coastal" in m and "remove 'prompts'" in m for m in messages)
    assert any("boho" in m and "must be true or false" in m for m in messages)
