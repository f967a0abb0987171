"""The analysts' SQL surface (migration 0005, docs/sql.md) against the real Postgres+pgvector.

A small catalog is written through ``tagger.db.repository`` with vectors built so that the expected
neighbours are known (``toward`` gives a vector at an exact cosine to another), plus 1,500 clustered filler
products in 10 categories assigned at random, so that recall under a category filter (10% of the catalog) can
be measured against exact search. Every ```sql block of docs/sql.md is run against it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from tagger.db import migrate
from tagger.db import repository as repo
from tagger.db.engine import create_database, get_engine
from tagger.duplicates import DuplicatePair
from tagger.scoring import TagDecision
from tagger.settings import REPO_ROOT, Settings
from tagger.taxonomy import load_taxonomies
from tagger.taxonomy.model import TaxonomySet

from .conftest import DIM, query_rows, query_value

MODEL = "test-model-v2"
OLD_MODEL = "test-model-v1"
CHAIN_MODEL = "test-chain-model"
DOCS = REPO_ROOT / "docs" / "sql.md"
FILLERS = 1_500
FILLER_CATEGORIES = ("tshirts", "shirts", "tops", "jeans", "trousers", "skirts", "sandals", "casual_shoes",
                     "handbags", "watches")
rng = np.random.default_rng(2026)


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def random_unit() -> np.ndarray:
    return unit(rng.standard_normal(DIM))


def toward(base: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at exactly ``cosine`` from ``base`` (the rest in a random orthogonal direction)."""
    other = rng.standard_normal(DIM)
    other -= other.dot(base) * base
    return unit(cosine * base + np.sqrt(1 - cosine**2) * unit(other))


@dataclass
class Item:
    sku: str
    title: str
    brand: str | None
    price: Any
    category: str | None  # leaf key of taxonomies/category.yaml, accepted rank 1
    image: np.ndarray | None  # None: the product has no embedding yet
    text: np.ndarray | None = None
    pattern: str | None = None
    category_status: str = "accepted"
    manual_category: str | None = None  # a person's category tag, which wins over the machine's

    @property
    def current_category(self) -> str | None:
        return self.manual_category or (self.category if self.category_status == "accepted" else None)


@dataclass
class Catalog:
    url: str
    items: dict[str, Item]
    fillers: list[Item]
    floral: np.ndarray


def write_item(conn: Connection, item: Item, taxonomies: TaxonomySet, model_id: str = MODEL) -> None:
    attributes = {} if item.price is None else {"price": item.price}
    repo.upsert_product(conn, sku=item.sku, title=item.title, description="", brand=item.brand,
                        image_ref=f"images/{item.sku}.jpg", attributes=attributes, image_hash=f"img-{item.sku}",
                        text_hash=f"txt-{item.sku}", occurred_at=None)
    if item.image is not None:
        repo.upsert_embedding(conn, sku=item.sku, model_id=model_id, image=item.image, text_vector=item.text,
                              image_hash=f"img-{item.sku}", text_hash=f"txt-{item.sku}")
    decisions = []
    if item.category:
        path = taxonomies.attribute("category").path(item.category)
        decisions.append(TagDecision("category", "category", item.category, 0.81, 1, item.category_status, path))
    if item.pattern:
        decisions.append(TagDecision("attributes", "pattern", item.pattern, 0.77, 1, "accepted"))
    repo.upsert_machine_tags(conn, item.sku, decisions, model_id=model_id, versions=taxonomies.versions,
                             attributes=["category", "pattern"])


@pytest.fixture(scope="module")
def catalog(server_settings: Settings) -> Iterator[Catalog]:
    assert server_settings.database_url
    url = create_database(server_settings.database_url, f"tagger_sql_{os.getpid()}")
    migrate.upgrade(url, DIM)
    taxonomies = load_taxonomies(REPO_ROOT / "taxonomies")
    dress = random_unit()  # the look of the floral wrap dress
    dress_text = random_unit()
    sandal = random_unit()
    sneaker = random_unit()
    items = [
        Item("DRS-1001", "Floral wrap dress", "Lumen", 59.90, "dresses", dress, dress_text, "floral"),
        # a reshoot of the same dress: a near-duplicate by image, its title written differently
        Item("DRS-1002", "Wrap dress with flowers (reshoot)", "Lumen", "59.90", "dresses", toward(dress, 0.97),
             toward(dress_text, 0.50), "floral"),
        Item("DRS-1003", "Floral midi dress", "Aster", 89.00, "dresses", toward(dress, 0.85), toward(dress_text, 0.95),
             "floral"),
        Item("DRS-1004", "Striped shirt dress", "Lumen", 45.00, "dresses", toward(dress, 0.60), None, "striped"),
        # looks most like the dress after its reshoot, but is a top
        Item("TOP-2001", "Floral blouse", "Lumen", 39.90, "tops", toward(dress, 0.92), toward(dress_text, 0.30),
             "floral"),
        Item("SHO-3001", "Leather sandal", "Strada", 49.00, "sandals", sandal),
        Item("SHO-3002", "Leather sandal, tan", "Strada", 49.00, "sandals", toward(sandal, 0.95)),
        Item("SHO-3003", "Leather sandal, tan, side view", "Strada", 52.00, "sandals", toward(sandal, 0.85)),
        Item("SHO-3004", "Canvas sneaker", "Strada", 35.00, "casual_shoes", sneaker),
        Item("SHO-3005", "Canvas sneaker, white", "Strada", 35.00, "casual_shoes", toward(sneaker, 0.96)),
        Item("BAG-5001", "Woven tote", None, None, "handbags", random_unit(), category_status="needs_review"),
        Item("NEW-6001", "Linen shirt (not embedded yet)", "Lumen", 29.00, None, None),
        Item("JNS-4002", "Slim jeans", "Denimco", "n/a", "trousers", random_unit(), manual_category="jeans"),
    ]
    by_sku = {item.sku: item for item in items}

    # Clustered fillers in 10 categories assigned at random, so a category filter keeps ~10% of the catalog.
    centres = [random_unit() for _ in range(30)]
    fillers = [Item(f"FIL-{i:05d}", f"Filler product {i}", f"Brand{i % 7}", 10 + i % 90,
                    FILLER_CATEGORIES[int(rng.integers(0, 10))], toward(centres[int(rng.integers(0, 30))], 0.8))
               for i in range(FILLERS)]

    floral = toward(dress, 0.7)  # the `floral` label's text embedding points at the dress's look
    engine = get_engine(url)
    # SHO-3003 is listed first (its own, earlier transaction): it represents its near-duplicate group.
    with engine.begin() as conn:
        write_item(conn, by_sku["SHO-3003"], taxonomies)
    with engine.begin() as conn:
        for item in items:
            if item.sku != "SHO-3003":
                write_item(conn, item, taxonomies)
        for item in fillers:
            write_item(conn, item, taxonomies)
        # A person corrected JNS-4002's category (as the review page records it): it wins over the machine's.
        for item in items:
            if item.manual_category:
                conn.execute(text("INSERT INTO tags (sku, taxonomy, attribute, value, score, rank, path, source, "
                                  "status) VALUES (:sku, 'category', 'category', :value, 1.0, 1, :path, 'manual', "
                                  "'approved')"),
                             {"sku": item.sku, "value": item.manual_category,
                              "path": taxonomies.attribute("category").path(item.manual_category)})
        repo.replace_duplicates(conn, "DRS-1001", MODEL, [DuplicatePair.of("DRS-1001", "DRS-1002", 0.97)])
        repo.replace_duplicates(conn, "SHO-3002", MODEL, [DuplicatePair.of("SHO-3001", "SHO-3002", 0.95),
                                                          DuplicatePair.of("SHO-3002", "SHO-3003", 0.93)])
        repo.replace_duplicates(conn, "SHO-3004", MODEL, [DuplicatePair.of("SHO-3004", "SHO-3005", 0.96)])
        # A long chain under another model: one group of 300, found in one pass.
        chain = [f.sku for f in fillers[:300]]
        for a, b in zip(chain, chain[1:], strict=False):
            repo.replace_duplicates(conn, b, CHAIN_MODEL, [DuplicatePair.of(a, b, 0.91)])

        # Label embeddings: the applied version of `attributes`, and a later draft nobody applied.
        attributes_taxonomy = taxonomies.taxonomy("attributes")
        repo.store_taxonomy(conn, attributes_taxonomy)
        pattern_labels = [label.key for label in taxonomies.attribute("pattern").scored_labels]
        rows = [("pattern", key, floral if key == "floral" else random_unit(), [key]) for key in pattern_labels]
        repo.store_label_embeddings(conn, MODEL, "attributes", attributes_taxonomy.version, rows)
        repo.mark_taxonomies_applied(conn, {"attributes": attributes_taxonomy.version})
    with engine.begin() as conn:
        repo.store_label_embeddings(conn, MODEL, "attributes", "draft-not-applied",
                                    [("pattern", "floral", random_unit(), ["floral"])])
        # An older model embedded three of the products; by it, the striped dress is DRS-1001's nearest.
        old = random_unit()
        for sku, vector in (("DRS-1001", old), ("DRS-1004", toward(old, 0.9)), ("DRS-1003", toward(old, 0.4))):
            repo.upsert_embedding(conn, sku=sku, model_id=OLD_MODEL, image=vector, text_vector=None,
                                  image_hash=f"old-{sku}", text_hash=f"old-{sku}")
        conn.execute(text("UPDATE embeddings SET updated_at = now() - interval '1 day', "
                          "created_at = now() - interval '1 day' WHERE model_id = :m"), {"m": OLD_MODEL})
        conn.execute(text("ANALYZE"))
    yield Catalog(url, by_sku, fillers, floral)
    engine.dispose()


def similar(url: str, sql: str, **params: Any) -> list[tuple[str, float]]:
    return [(r[0], float(r[1])) for r in query_rows(url, sql, **params)]


def raises(url: str, sql: str, **params: Any) -> str:
    """The error's message and hint, as an analyst sees them in psql."""
    with pytest.raises(DBAPIError) as info:
        query_rows(url, sql, **params)
    diag = info.value.orig.diag  # type: ignore[union-attr]
    return f"{diag.message_primary}\nHINT: {diag.message_hint}"


# ---- similar_products ---------------------------------------------------------------------------------------


def test_similar_products_returns_the_seeded_near_duplicate_first(catalog: Catalog) -> None:
    rows = query_rows(catalog.url, "SELECT * FROM similar_products('DRS-1001', 5)")
    assert [r.sku for r in rows[:3]] == ["DRS-1002", "TOP-2001", "DRS-1003"]
    assert rows[0].similarity == pytest.approx(0.97, abs=1e-4)
    assert [r.similarity for r in rows] == sorted((r.similarity for r in rows), reverse=True)
    assert "DRS-1001" not in [r.sku for r in rows] and len(rows) == 5
    first = rows[0]
    assert (first.title, first.brand, first.category) == ("Wrap dress with flowers (reshoot)", "Lumen", "dresses")
    assert float(first.price) == pytest.approx(59.90)  # a numeric string in the PIM attributes counts
    assert first.main_tags == {"category": "dresses", "pattern": "floral"}


def test_same_category_keeps_only_that_category(catalog: Catalog) -> None:
    rows = query_rows(catalog.url, "SELECT * FROM similar_products('DRS-1001', 10, same_category => true)")
    assert [r.sku for r in rows] == ["DRS-1002", "DRS-1003", "DRS-1004"]  # the blouse is a top
    assert {r.category for r in rows} == {"dresses"}
    # A person's category wins: JNS-4002 counts as jeans, not as the machine's trousers.
    jeans = query_rows(catalog.url, "SELECT * FROM similar_products('JNS-4002', 20, same_category => true)")
    expected = {f.sku for f in catalog.fillers if f.category == "jeans"}
    assert jeans and {r.sku for r in jeans} <= expected


def test_min_similarity_brand_and_price_band(catalog: Catalog) -> None:
    rows = query_rows(catalog.url, "SELECT * FROM similar_products('DRS-1001', 10, min_similarity => 0.8)")
    assert [r.sku for r in rows] == ["DRS-1002", "TOP-2001", "DRS-1003"]
    rows = query_rows(catalog.url, "SELECT * FROM similar_products('DRS-1001', 10, min_similarity => 0.5, "
                                   "same_brand => true)")
    assert [r.sku for r in rows] == ["DRS-1002", "TOP-2001", "DRS-1004"]  # Aster's midi dress is out
    # Within 30% of 59.90: 41.93 .. 77.87, so the 89.00 dress and the 39.90 blouse drop out.
    rows = query_rows(catalog.url, "SELECT * FROM similar_products('DRS-1001', 10, min_similarity => 0.5, "
                                   "price_within => 0.3)")
    assert [r.sku for r in rows] == ["DRS-1002", "DRS-1004"]


def test_text_and_combined_embeddings(catalog: Catalog) -> None:
    by_text = similar(catalog.url, "SELECT sku, similarity FROM similar_products('DRS-1001', 3, embedding => 'text')")
    assert by_text[0][0] == "DRS-1003" and by_text[0][1] == pytest.approx(0.95, abs=1e-4)
    combined = similar(catalog.url, "SELECT sku, similarity FROM similar_products('DRS-1001', 3, "
                                    "embedding => 'combined')")
    # (image + text) / 2: midi dress (0.85 + 0.95) / 2 = 0.90 beats the reshoot (0.97 + 0.50) / 2 = 0.735
    assert [sku for sku, _ in combined] == ["DRS-1003", "DRS-1002", "TOP-2001"]
    assert combined[0][1] == pytest.approx(0.90, abs=1e-3) and combined[1][1] == pytest.approx(0.735, abs=1e-3)


def test_model_defaults_to_the_products_latest_embedding(catalog: Catalog) -> None:
    latest = similar(catalog.url, "SELECT sku, similarity FROM similar_products('DRS-1001', 1)")
    assert latest[0][0] == "DRS-1002"
    old = similar(catalog.url, "SELECT sku, similarity FROM similar_products('DRS-1001', 5, model_id => :m)",
                  m=OLD_MODEL)
    assert [sku for sku, _ in old] == ["DRS-1004", "DRS-1003"]  # only what that model embedded
    assert old[0][1] == pytest.approx(0.9, abs=1e-4)


def test_errors_say_what_to_do(catalog: Catalog) -> None:
    message = raises(catalog.url, "SELECT * FROM similar_products('NO-SUCH-SKU')")
    assert "unknown SKU 'NO-SUCH-SKU'" in message and "case-sensitive" in message
    assert "has no embedding yet" in raises(catalog.url, "SELECT * FROM similar_products('NEW-6001')")
    message = raises(catalog.url, "SELECT * FROM similar_products('DRS-1001', model_id => 'other-model')")
    assert "no embedding of model 'other-model'" in message and f"{OLD_MODEL}, {MODEL}" in message
    assert "no category tag" in raises(catalog.url, "SELECT * FROM similar_products('BAG-5001', same_category => true)")
    assert "no brand" in raises(catalog.url, "SELECT * FROM similar_products('BAG-5001', same_brand => true)")
    assert "no numeric price" in raises(catalog.url, "SELECT * FROM similar_products('JNS-4002', price_within => 0.1)")
    assert "no text embedding" in raises(catalog.url, "SELECT * FROM similar_products('DRS-1004', embedding => 'text')")
    assert "not one of image, text, combined" in raises(catalog.url,
                                                        "SELECT * FROM similar_products('DRS-1001', embedding => 'img')")
    assert "k = 0 is out of range" in raises(catalog.url, "SELECT * FROM similar_products('DRS-1001', 0)")


# ---- index use and recall ------------------------------------------------------------------------------------


def index_scans(conn: Connection, index: str) -> int:
    return int(conn.execute(text("SELECT pg_stat_get_xact_numscans(CAST(:i AS regclass))"), {"i": index}).scalar())


def test_the_hnsw_index_serves_similar_products(catalog: Catalog) -> None:
    # Per-transaction statistics count the index scans the function's own query made.
    with get_engine(catalog.url).connect() as conn:
        before = index_scans(conn, "embeddings_image_hnsw")
        rows = conn.execute(text("SELECT sku FROM similar_products('FIL-00007', 10)")).all()
        assert len(rows) == 10
        assert index_scans(conn, "embeddings_image_hnsw") > before
        before = index_scans(conn, "embeddings_text_hnsw")
        conn.execute(text("SELECT sku FROM similar_products('DRS-1001', 3, embedding => 'text')")).all()
        assert index_scans(conn, "embeddings_text_hnsw") > before
        conn.rollback()


def exact_neighbours(catalog: Catalog, sku: str, k: int, same_category: bool) -> list[str]:
    everything = [*catalog.fillers, *(i for i in catalog.items.values() if i.image is not None)]
    query = next(i for i in everything if i.sku == sku)
    pool = [i for i in everything
            if i.sku != sku and (not same_category or i.current_category == query.current_category)]
    scores = np.array([float(query.image @ i.image) for i in pool])  # type: ignore[operator]
    return [pool[j].sku for j in np.argsort(-scores, kind="stable")[:k]]


def test_filtered_similarity_keeps_recall_against_exact_search(catalog: Catalog) -> None:
    queries = [f.sku for f in catalog.fillers[::75]]  # 20 products
    with get_engine(catalog.url).connect() as conn:
        # The function searches the HNSW index even where an exact scan would be cheaper (as on a catalog this
        # small), so the iterative scan is what is measured: without it a 10% filter would return ~4 rows.
        before = index_scans(conn, "embeddings_image_hnsw")
        recalls = {True: [], False: []}
        for sku in queries:
            for same_category in (True, False):
                found = [r[0] for r in conn.execute(
                    text("SELECT sku FROM similar_products(:s, 10, same_category => :c, min_similarity => -1)"),
                    {"s": sku, "c": same_category})]
                assert len(found) == 10, (sku, same_category, found)
                exact = exact_neighbours(catalog, sku, 10, same_category)
                recalls[same_category].append(len(set(found) & set(exact)) / 10)
        assert index_scans(conn, "embeddings_image_hnsw") >= before + 2 * len(queries)
        conn.rollback()
    assert np.mean(recalls[False]) >= 0.97, recalls[False]
    assert np.mean(recalls[True]) >= 0.95, recalls[True]


def test_nearest_products_leaves_the_session_settings_alone(catalog: Catalog) -> None:
    query = "(SELECT image_embedding FROM embeddings WHERE sku = 'DRS-1001' AND model_id = :m)"
    with get_engine(catalog.url).connect() as conn:
        conn.execute(text("SET LOCAL hnsw.ef_search = 77"))
        rows = conn.execute(text(f"SELECT sku FROM nearest_products({query}, 3, :m, ef_search => 500)"),
                            {"m": MODEL}).all()
        assert [r.sku for r in rows] == ["DRS-1001", "DRS-1002", "TOP-2001"]  # nothing excluded: itself first
        settings = conn.execute(text("SELECT current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan'), "
                                     "current_setting('enable_sort')")).one()
        assert tuple(settings) == ("77", "off", "on")
        conn.rollback()
    assert "ef_search = 5 is out of range" in raises(
        catalog.url, f"SELECT * FROM nearest_products({query}, ef_search => 5)", m=MODEL)


# ---- products_like_label ------------------------------------------------------------------------------------


def test_products_like_label_finds_the_tagged_products_first(catalog: Catalog) -> None:
    rows = query_rows(catalog.url, "SELECT * FROM products_like_label('attributes', 'pattern', 'floral', 6)")
    floral = {"DRS-1001", "DRS-1002", "DRS-1003", "TOP-2001"}
    assert {r.sku for r in rows[:4]} == floral and all(r.tagged for r in rows[:4])
    assert rows[4].sku == "DRS-1004" and not rows[4].tagged  # near the dress, but striped
    # The applied version's label embedding is used, not the later unapplied draft.
    expected = {sku: float(catalog.floral @ catalog.items[sku].image) for sku in floral}  # type: ignore[operator]
    assert [r.sku for r in rows[:4]] == sorted(expected, key=expected.__getitem__, reverse=True)
    assert [r.similarity for r in rows[:4]] == pytest.approx(sorted(expected.values(), reverse=True), abs=1e-4)


def test_products_like_label_errors_list_the_known_labels(catalog: Catalog) -> None:
    message = raises(catalog.url, "SELECT * FROM products_like_label('attributes', 'pattern', 'flowery')")
    assert "no label 'flowery' in attributes.pattern" in message
    assert "checked, floral, printed, solid, striped" in message
    message = raises(catalog.url, "SELECT * FROM products_like_label('attributes', 'neckline', 'v_neck')")
    assert "no label embeddings for attribute attributes.neckline" in message and "attributes.pattern" in message


# ---- views --------------------------------------------------------------------------------------------------


def test_near_duplicate_groups(catalog: Catalog) -> None:
    groups = {r.representative_sku: r for r in query_rows(
        catalog.url, "SELECT * FROM near_duplicate_groups WHERE model_id = :m", m=MODEL)}
    assert set(groups) == {"DRS-1001", "SHO-3003", "SHO-3004"}
    chain = groups["SHO-3003"]  # SHO-3001 ~ SHO-3002 ~ SHO-3003, SHO-3003 listed first
    assert (chain.group_size, chain.skus, chain.pairs) == (3, ["SHO-3001", "SHO-3002", "SHO-3003"], 2)
    assert (chain.min_similarity, chain.max_similarity) == (pytest.approx(0.93), pytest.approx(0.95))
    assert groups["DRS-1001"].skus == ["DRS-1001", "DRS-1002"] and groups["SHO-3004"].group_size == 2
    long_chain = query_rows(catalog.url, "SELECT * FROM near_duplicate_groups WHERE model_id = :m", m=CHAIN_MODEL)
    assert [(r.representative_sku, r.group_size, r.pairs) for r in long_chain] == [("FIL-00000", 300, 299)]


def test_current_tags_long_and_wide(catalog: Catalog) -> None:
    url = catalog.url
    assert query_value(url, "SELECT count(*) FROM current_tags_wide") == query_value(url, "SELECT count(*) FROM products")
    assert query_value(url, "SELECT count(DISTINCT sku) FROM current_tags_wide") == len(catalog.items) + FILLERS
    wide = query_rows(url, "SELECT * FROM current_tags_wide WHERE sku = 'DRS-1001'")[0]
    assert (wide.category, wide.category_path) == ("dresses", "apparel > dresses_group > dresses")
    assert wide.tags["pattern"] == {"value": "floral", "confidence": pytest.approx(0.77), "source": "machine"}
    assert float(wide.price) == pytest.approx(59.90)
    jeans = query_rows(url, "SELECT * FROM current_tags_wide WHERE sku = 'JNS-4002'")[0]
    assert jeans.category == "jeans" and jeans.tags["category"]["source"] == "manual" and jeans.price is None
    # needs_review is not in force: the tote has no category; an unembedded product still has its row
    assert query_value(url, "SELECT category FROM current_tags_wide WHERE sku = 'BAG-5001'") is None
    assert query_value(url, "SELECT tags FROM current_tags_wide WHERE sku = 'NEW-6001'") == {}
    long = query_rows(url, "SELECT value, source, is_main FROM current_tags WHERE sku = 'JNS-4002' "
                           "AND attribute = 'category'")
    assert [tuple(r) for r in long] == [("jeans", "manual", True)]  # the machine's trousers is hidden
    assert query_value(url, "SELECT count(*) FROM (SELECT sku, attribute FROM current_tags WHERE is_main "
                            "GROUP BY 1, 2 HAVING count(*) <> 1) s") == 0
    dresses = {r[0] for r in query_rows(url, "SELECT sku FROM current_tags WHERE attribute = 'category' "
                                             "AND value = 'dresses'")}
    assert dresses == {"DRS-1001", "DRS-1002", "DRS-1003", "DRS-1004"}


# ---- docs/sql.md --------------------------------------------------------------------------------------------


def sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_have_examples_of_every_function_and_view() -> None:
    docs = "\n".join(sql_blocks())
    for name in ("similar_products", "products_like_label", "nearest_products", "near_duplicate_groups",
                 "current_tags_wide", "current_tags", "product_main_tags", "product_price"):
        assert name in docs, f"docs/sql.md has no example of {name}"


@pytest.mark.parametrize("block", sql_blocks(), ids=lambda b: b.strip().splitlines()[0][:60])
def test_docs_example_runs(catalog: Catalog, block: str) -> None:
    """Each example runs as written; one marked `-- raises: <text>` must fail with that text."""
    expected_error = re.search(r"--\s*raises:\s*(.+)", block)
    raw = get_engine(catalog.url).raw_connection()
    try:
        with raw.cursor() as cur:
            if expected_error:
                with pytest.raises(Exception, match=re.escape(expected_error.group(1).strip())):
                    cur.execute(block)
            else:
                cur.execute(block)
                last_rows: list[Any] | None = None
                while True:  # a block may hold several statements: the last one that returns rows counts
                    if cur.description is not None:
                        last_rows = cur.fetchall()
                    if not cur.nextset():
                        break
                assert last_rows, f"the example returned no rows:\n{block}"
    finally:
        raw.rollback()
        raw.close()


def test_migration_downgrade_removes_the_surface(fresh_database: Any) -> None:
    url = fresh_database()
    migrate.upgrade(url, DIM, "0005")
    names = ("similar_products", "products_like_label", "nearest_products", "near_duplicate_components",
             "product_main_tags", "product_price")
    count = "SELECT count(*) FROM pg_proc WHERE proname = ANY(:n)"
    assert query_value(url, count, n=list(names)) == len(names)
    assert query_value(url, "SELECT count(*) FROM pg_description d JOIN pg_proc p ON p.oid = d.objoid "
                            "WHERE p.proname = ANY(:n)", n=list(names)) == len(names)
    migrate.downgrade(url, DIM, "0004")
    assert query_value(url, count, n=list(names)) == 0
    assert query_value(url, "SELECT count(*) FROM pg_views WHERE viewname IN ('current_tags', 'current_tags_wide', "
                            "'near_duplicate_groups')") == 0
    migrate.upgrade(url, DIM, "0005")
    assert query_value(url, count, n=list(names)) == len(names)

