"""SQL surface for analysts: similarity functions, tag views, duplicate groups (guide: docs/sql.md).

- ``current_tags`` (long view): the tags in force, one row per product, attribute and value, with ``is_main``
  marking the one main value per attribute. A person's tag (manual, or approved) hides the machine's tags of
  the same attribute.
- ``current_tags_wide`` (wide view): one row per product, its main tag of every attribute as a JSONB key
  (value, confidence, path, source) plus ``category`` and ``category_path`` columns.
- ``product_price(attributes)``: the PIM price as numeric (a number or a numeric string), else NULL.
- ``product_main_tags(sku)``: {attribute: value} of a product's main tags.
- ``nearest_products(query vector, ...)``: k nearest products to any vector, through the HNSW indexes
  (``hnsw.ef_search`` 400 unless asked otherwise), with optional category, brand and price filters that keep
  their k rows through pgvector 0.8 iterative index scans.
- ``similar_products(sku, k, same_category, min_similarity, ...)``: the products most like a stored one
  (image, text or combined embedding), with their main tags.
- ``products_like_label(taxonomy, attribute, label, k, ...)``: products nearest to a label's stored text
  embedding (text search without Python).
- ``near_duplicate_components()`` and the ``near_duplicate_groups`` view: connected groups of near-duplicate
  SKUs (union-find over ``duplicate_matches``) with a representative and the group size.

Every function raises with a message (and HINT) an analyst can act on, e.g. on an unknown SKU, instead of
returning nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# A tag is in force when it was accepted (machine) or decided by a person; a person's decision (a manual tag
# not rejected, or an approved one) outranks the machine for the same attribute.
IN_FORCE = "({t}.status IN ('accepted', 'approved') OR ({t}.source = 'manual' AND {t}.status <> 'rejected'))"
BY_PERSON = "(({t}.source = 'manual' AND {t}.status <> 'rejected') OR {t}.status = 'approved')"

CURRENT_TAGS = f"""
CREATE VIEW current_tags AS
SELECT t.sku, t.taxonomy, t.attribute, t.value, t.path, t.score AS confidence, t.rank, t.source, t.status,
       {BY_PERSON.format(t="t")} AS decided_by_person,
       -- the main value: person first, then machine rank, score, value (a strict order, so exactly one)
       NOT EXISTS (
           SELECT 1 FROM tags o
           WHERE o.sku = t.sku AND o.attribute = t.attribute AND o.value <> t.value AND {IN_FORCE.format(t="o")}
             AND (NOT {BY_PERSON.format(t="o")}, o.rank, -o.score, o.value)
                 < (NOT {BY_PERSON.format(t="t")}, t.rank, -t.score, t.value)
       ) AS is_main,
       t.model_id, t.taxonomy_version, t.updated_at
FROM tags t
WHERE {IN_FORCE.format(t="t")}
  AND ({BY_PERSON.format(t="t")}
       OR NOT EXISTS (SELECT 1 FROM tags p
                      WHERE p.sku = t.sku AND p.attribute = t.attribute AND {BY_PERSON.format(t="p")}))
"""

CURRENT_TAGS_WIDE = """
CREATE VIEW current_tags_wide AS
SELECT p.sku, p.title, p.brand, product_price(p.attributes) AS price,
       m.tags -> 'category' ->> 'value' AS category,
       m.tags -> 'category' ->> 'path' AS category_path,
       coalesce(m.tags, '{}'::jsonb) AS tags
FROM products p
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(c.attribute, jsonb_strip_nulls(jsonb_build_object(
               'value', c.value, 'confidence', c.confidence, 'path', c.path, 'source', c.source,
               -- further values in force of a multi-valued attribute
               'also', (SELECT jsonb_agg(o.value ORDER BY o.rank, o.confidence DESC)
                        FROM current_tags o WHERE o.sku = c.sku AND o.attribute = c.attribute AND NOT o.is_main)
           )) ORDER BY c.attribute) AS tags
    FROM current_tags c
    WHERE c.sku = p.sku AND c.is_main
) m ON true
"""

PRODUCT_PRICE = r"""
CREATE FUNCTION product_price(attributes jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(attributes -> 'price')
        WHEN 'number' THEN (attributes ->> 'price')::numeric
        -- PIMs often send prices as strings; anything that is not a plain number counts as no price
        WHEN 'string' THEN CASE WHEN btrim(attributes ->> 'price') ~ '^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)$'
                                THEN btrim(attributes ->> 'price')::numeric END
    END
$$
"""

PRODUCT_MAIN_TAGS = """
CREATE FUNCTION product_main_tags(sku text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_object_agg(c.attribute, c.value ORDER BY c.attribute), '{}'::jsonb)
    FROM current_tags c
    WHERE c.sku = product_main_tags.sku AND c.is_main
$$
"""

# hnsw.ef_search the similarity functions search with. On 1M clustered 512-d vectors (bench/results/
# pgvector_scale.md) pgvector's default 40 found 88% of the true 10 nearest at p50 1.5 ms, 400 found 97% at 2.9 ms.
DEFAULT_EF_SEARCH = 400

# The one place that searches the HNSW indexes. Dynamic SQL so that each call is planned with its actual values
# (a one-shot plan, `ORDER BY column <=> $1 LIMIT k` on the index) and carries only the filters asked for.
NEAREST_PRODUCTS = rf"""
CREATE FUNCTION nearest_products(
    query vector,
    k integer DEFAULT 10,
    model_id text DEFAULT NULL,
    embedding text DEFAULT 'image',
    category text DEFAULT NULL,
    brand text DEFAULT NULL,
    price_min numeric DEFAULT NULL,
    price_max numeric DEFAULT NULL,
    exclude_sku text DEFAULT NULL,
    text_query vector DEFAULT NULL,
    ef_search integer DEFAULT {DEFAULT_EF_SEARCH}
) RETURNS TABLE (sku text, similarity double precision)
LANGUAGE plpgsql STABLE
-- Function-level settings, restored when the function returns. Iterative index scans keep reading the HNSW
-- graph until k rows pass the filters (pgvector >= 0.8); the relaxed order is made exact again below.
SET hnsw.iterative_scan = relaxed_order
-- Named here so that the set_config below is undone when the function returns, like the settings above.
SET hnsw.ef_search = {DEFAULT_EF_SEARCH}
-- A filter is a subquery per row whose selectivity the planner can only guess (0.5%); from such a guess it
-- would read and sort the whole table. With sorting disabled the one plan without a Sort is the HNSW scan.
SET enable_sort = off
AS $fn$
#variable_conflict use_column
DECLARE
    model text := nearest_products.model_id;
    filters text := '';
    text_vector vector := coalesce(nearest_products.text_query, nearest_products.query);
    candidates integer;
    sql text;
BEGIN
    IF nearest_products.query IS NULL THEN
        RAISE EXCEPTION 'nearest_products: query vector is NULL';
    END IF;
    IF nearest_products.k IS NULL OR nearest_products.k NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'nearest_products: k = % is out of range', nearest_products.k
            USING HINT = 'ask for 1 to 1000 products';
    END IF;
    IF nearest_products.ef_search IS NULL OR nearest_products.ef_search NOT BETWEEN 10 AND 1000 THEN
        RAISE EXCEPTION 'nearest_products: ef_search = % is out of range', nearest_products.ef_search
            USING HINT = 'pgvector accepts 10 to 1000; higher finds more of the true nearest products, slower';
    END IF;
    PERFORM set_config('hnsw.ef_search', nearest_products.ef_search::text, true);
    IF nearest_products.embedding IS NULL OR nearest_products.embedding NOT IN ('image', 'text', 'combined') THEN
        RAISE EXCEPTION 'nearest_products: embedding = % is not one of image, text, combined',
            coalesce(quote_literal(nearest_products.embedding), 'NULL');
    END IF;
    IF model IS NULL THEN
        -- The model that embedded a product most recently: the one the workers use now.
        SELECT e.model_id INTO model FROM embeddings e ORDER BY e.updated_at DESC, e.model_id LIMIT 1;
        IF model IS NULL THEN
            RAISE EXCEPTION 'nearest_products: no product has an embedding yet'
                USING HINT = 'products are embedded when a worker processes their events';
        END IF;
    END IF;

    IF nearest_products.category IS NOT NULL THEN
        filters := filters || ' AND (SELECT c.value FROM current_tags c WHERE c.sku = e.sku'
                           || ' AND c.attribute = ''category'' AND c.is_main) = $5';
    END IF;
    IF nearest_products.brand IS NOT NULL THEN
        filters := filters || ' AND (SELECT p.brand FROM products p WHERE p.sku = e.sku) = $6';
    END IF;
    IF nearest_products.price_min IS NOT NULL THEN
        filters := filters || ' AND product_price((SELECT p.attributes FROM products p WHERE p.sku = e.sku)) >= $7';
    END IF;
    IF nearest_products.price_max IS NOT NULL THEN
        filters := filters || ' AND product_price((SELECT p.attributes FROM products p WHERE p.sku = e.sku)) <= $8';
    END IF;

    IF nearest_products.embedding IN ('image', 'text') THEN
        sql := format(
            'WITH nearest AS MATERIALIZED ('
            '    SELECT e.sku, e.%1$I <=> $1 AS distance FROM embeddings e'
            '    WHERE e.model_id = $2 AND e.sku IS DISTINCT FROM $3 AND e.%1$I IS NOT NULL %2$s'
            '    ORDER BY e.%1$I <=> $1 LIMIT $4)'
            ' SELECT n.sku, 1 - n.distance FROM nearest n ORDER BY n.distance, n.sku',
            nearest_products.embedding || '_embedding', filters);
        RETURN QUERY EXECUTE sql
            USING CASE WHEN nearest_products.embedding = 'text' THEN text_vector ELSE nearest_products.query END,
                  model, nearest_products.exclude_sku, nearest_products.k, nearest_products.category,
                  nearest_products.brand, nearest_products.price_min, nearest_products.price_max;
        RETURN;
    END IF;

    -- Combined: the mean of image and text cosine similarity. No index orders by it, so the candidates are the
    -- nearest by image and the nearest by text (a pair whose mean is high is high on at least one side),
    -- re-ranked exactly.
    candidates := greatest(5 * nearest_products.k, 50);
    sql := format(
        'WITH by_image AS MATERIALIZED ('
        '    SELECT e.sku FROM embeddings e'
        '    WHERE e.model_id = $2 AND e.sku IS DISTINCT FROM $3 AND e.text_embedding IS NOT NULL %1$s'
        '    ORDER BY e.image_embedding <=> $1 LIMIT $9),'
        ' by_text AS MATERIALIZED ('
        '    SELECT e.sku FROM embeddings e'
        '    WHERE e.model_id = $2 AND e.sku IS DISTINCT FROM $3 AND e.text_embedding IS NOT NULL %1$s'
        '    ORDER BY e.text_embedding <=> $10 LIMIT $9)'
        ' SELECT e.sku, 1 - ((e.image_embedding <=> $1) + (e.text_embedding <=> $10)) / 2 AS similarity'
        ' FROM embeddings e'
        ' WHERE e.model_id = $2 AND e.sku IN (SELECT sku FROM by_image UNION SELECT sku FROM by_text)'
        ' ORDER BY similarity DESC, e.sku LIMIT $4',
        filters);
    RETURN QUERY EXECUTE sql
        USING nearest_products.query, model, nearest_products.exclude_sku, nearest_products.k,
              nearest_products.category, nearest_products.brand, nearest_products.price_min,
              nearest_products.price_max, candidates, text_vector;
END
$fn$
"""

SIMILAR_PRODUCTS = r"""
CREATE FUNCTION similar_products(
    query_sku text,
    k integer DEFAULT 10,
    same_category boolean DEFAULT false,
    min_similarity double precision DEFAULT 0,
    embedding text DEFAULT 'image',
    model_id text DEFAULT NULL,
    same_brand boolean DEFAULT false,
    price_within numeric DEFAULT NULL
) RETURNS TABLE (sku text, similarity double precision, title text, brand text, price numeric, category text,
                 main_tags jsonb)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    product products%ROWTYPE;
    model text := similar_products.model_id;
    image_vector vector;
    text_vector vector;
    product_category text;
    product_price_value numeric;
    models text;
BEGIN
    IF similar_products.query_sku IS NULL THEN
        RAISE EXCEPTION 'similar_products: sku is NULL';
    END IF;
    IF similar_products.min_similarity IS NULL OR similar_products.min_similarity NOT BETWEEN -1 AND 1 THEN
        RAISE EXCEPTION 'similar_products: min_similarity = % is out of range', similar_products.min_similarity
            USING HINT = 'cosine similarity lies between -1 and 1; -1 keeps every result';
    END IF;
    IF similar_products.price_within IS NOT NULL AND similar_products.price_within < 0 THEN
        RAISE EXCEPTION 'similar_products: price_within = % is negative', similar_products.price_within
            USING HINT = 'price_within is a fraction of the product''s price: 0.2 keeps prices within 20%';
    END IF;

    SELECT * INTO product FROM products p WHERE p.sku = similar_products.query_sku;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'similar_products: unknown SKU %', quote_literal(similar_products.query_sku)
            USING ERRCODE = 'no_data_found', HINT = 'no product has this SKU (SKUs are case-sensitive); '
                  'check SELECT sku FROM products WHERE sku ILIKE ...';
    END IF;

    SELECT string_agg(e.model_id, ', ' ORDER BY e.model_id) INTO models
    FROM embeddings e WHERE e.sku = product.sku;
    IF models IS NULL THEN
        RAISE EXCEPTION 'similar_products: SKU % has no embedding yet', quote_literal(product.sku)
            USING ERRCODE = 'no_data_found', HINT = 'it is embedded when a worker processes its event; '
                  'see SELECT * FROM failures WHERE sku = ' || quote_literal(product.sku);
    END IF;
    IF model IS NULL THEN
        -- The model of the product's most recent embedding (a database may hold several models).
        SELECT e.model_id INTO model FROM embeddings e WHERE e.sku = product.sku
        ORDER BY e.updated_at DESC, e.created_at DESC, e.model_id LIMIT 1;
    END IF;
    SELECT e.image_embedding, e.text_embedding INTO image_vector, text_vector
    FROM embeddings e WHERE e.sku = product.sku AND e.model_id = model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'similar_products: SKU % has no embedding of model %', quote_literal(product.sku),
            quote_literal(model) USING ERRCODE = 'no_data_found', HINT = 'its embeddings are of: ' || models;
    END IF;
    IF similar_products.embedding IN ('text', 'combined') AND text_vector IS NULL THEN
        RAISE EXCEPTION 'similar_products: SKU % has no text embedding', quote_literal(product.sku)
            USING HINT = 'use embedding => ''image''';
    END IF;

    IF similar_products.same_category THEN
        product_category := product_main_tags(product.sku) ->> 'category';
        IF product_category IS NULL THEN
            RAISE EXCEPTION 'similar_products: SKU % has no category tag, so same_category cannot apply',
                quote_literal(product.sku)
                USING HINT = 'its category tag may wait for review (see product_tags); or call without same_category';
        END IF;
    END IF;
    IF similar_products.same_brand AND product.brand IS NULL THEN
        RAISE EXCEPTION 'similar_products: SKU % has no brand, so same_brand cannot apply', quote_literal(product.sku);
    END IF;
    IF similar_products.price_within IS NOT NULL THEN
        product_price_value := product_price(product.attributes);
        IF product_price_value IS NULL THEN
            RAISE EXCEPTION 'similar_products: SKU % has no numeric price in its attributes, so price_within '
                'cannot apply', quote_literal(product.sku)
                USING HINT = 'the PIM sends it as attributes.price';
        END IF;
    END IF;

    RETURN QUERY
        SELECT n.sku, n.similarity, p.title, p.brand, product_price(p.attributes), t.tags ->> 'category', t.tags
        FROM nearest_products(
            image_vector, similar_products.k, model, similar_products.embedding,
            category => product_category,
            brand => CASE WHEN similar_products.same_brand THEN product.brand END,
            price_min => product_price_value * (1 - similar_products.price_within),
            price_max => product_price_value * (1 + similar_products.price_within),
            exclude_sku => product.sku, text_query => text_vector) n
        JOIN products p ON p.sku = n.sku
        CROSS JOIN LATERAL product_main_tags(n.sku) AS t(tags)
        WHERE n.similarity >= similar_products.min_similarity
        ORDER BY n.similarity DESC, n.sku;
END
$fn$
"""

PRODUCTS_LIKE_LABEL = r"""
CREATE FUNCTION products_like_label(
    taxonomy text,
    attribute text,
    label text,
    k integer DEFAULT 10,
    embedding text DEFAULT 'image',
    model_id text DEFAULT NULL
) RETURNS TABLE (sku text, similarity double precision, tagged boolean, title text, brand text, category text,
                 main_tags jsonb)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    model text := products_like_label.model_id;
    version text;
    label_vector vector;
    known text;
BEGIN
    IF model IS NULL THEN
        -- The model whose label embeddings of this label were stored last, among models that embedded products.
        SELECT le.model_id INTO model FROM label_embeddings le
        WHERE le.taxonomy = products_like_label.taxonomy AND le.attribute = products_like_label.attribute
          AND le.label = products_like_label.label
          AND EXISTS (SELECT 1 FROM embeddings e WHERE e.model_id = le.model_id)
        ORDER BY le.created_at DESC, le.model_id LIMIT 1;
    END IF;
    -- The current version: the applied one (taxonomy_state), else the most recently applied, else the newest.
    SELECT le.taxonomy_version, le.embedding INTO version, label_vector
    FROM label_embeddings le
    LEFT JOIN taxonomy_state s ON s.taxonomy = le.taxonomy
    LEFT JOIN taxonomy_versions v ON v.taxonomy = le.taxonomy AND v.version = le.taxonomy_version
    WHERE le.model_id = model AND le.taxonomy = products_like_label.taxonomy
      AND le.attribute = products_like_label.attribute AND le.label = products_like_label.label
    ORDER BY (le.taxonomy_version = s.version) DESC NULLS LAST, v.applied_at DESC NULLS LAST,
             coalesce(v.created_at, le.created_at) DESC, le.created_at DESC
    LIMIT 1;
    IF label_vector IS NULL THEN
        SELECT string_agg(DISTINCT le.label, ', ' ORDER BY le.label) INTO known FROM label_embeddings le
        WHERE le.taxonomy = products_like_label.taxonomy AND le.attribute = products_like_label.attribute
          AND (model IS NULL OR le.model_id = model);
        IF known IS NULL THEN
            SELECT string_agg(DISTINCT le.taxonomy || '.' || le.attribute, ', '
                              ORDER BY le.taxonomy || '.' || le.attribute) INTO known
            FROM label_embeddings le WHERE model IS NULL OR le.model_id = model;
            RAISE EXCEPTION 'products_like_label: no label embeddings for attribute %', products_like_label.taxonomy
                || '.' || products_like_label.attribute
                || CASE WHEN model IS NULL THEN '' ELSE ' of model ' || quote_literal(model) END
                USING ERRCODE = 'no_data_found',
                      HINT = CASE WHEN known IS NULL THEN 'label embeddings are stored when a worker first tags '
                                  'products or by tagger taxonomy apply'
                             ELSE 'attributes with label embeddings: ' || known END;
        END IF;
        RAISE EXCEPTION 'products_like_label: no label % in %', quote_literal(products_like_label.label),
            products_like_label.taxonomy || '.' || products_like_label.attribute
            || CASE WHEN model IS NULL THEN '' ELSE ' for model ' || quote_literal(model) END
            USING ERRCODE = 'no_data_found', HINT = 'labels (keys, not display names): ' || known;
    END IF;

    RETURN QUERY
        SELECT n.sku, n.similarity,
               EXISTS (SELECT 1 FROM current_tags c WHERE c.sku = n.sku AND c.attribute = products_like_label.attribute
                       AND c.value = products_like_label.label),
               p.title, p.brand, t.tags ->> 'category', t.tags
        FROM nearest_products(label_vector, products_like_label.k, model, products_like_label.embedding) n
        JOIN products p ON p.sku = n.sku
        CROSS JOIN LATERAL product_main_tags(n.sku) AS t(tags)
        ORDER BY n.similarity DESC, n.sku;
END
$fn$
"""

NEAR_DUPLICATE_COMPONENTS = r"""
CREATE FUNCTION near_duplicate_components(only_model text DEFAULT NULL)
RETURNS TABLE (model_id text, sku text, component integer)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    model text;
    skus text[];
    lefts integer[];
    rights integer[];
    parent integer[];
    a integer;
    b integer;
BEGIN
    -- Union-find per model: linear in the number of pairs, whatever the groups' shapes (a recursive CTE
    -- would enumerate every path of a long chain).
    FOR model IN
        SELECT DISTINCT d.model_id FROM duplicate_matches d
        WHERE near_duplicate_components.only_model IS NULL OR d.model_id = near_duplicate_components.only_model
        ORDER BY 1
    LOOP
        SELECT array_agg(s.sku ORDER BY s.sku) INTO skus FROM (
            SELECT d.sku_a AS sku FROM duplicate_matches d WHERE d.model_id = model
            UNION SELECT d.sku_b FROM duplicate_matches d WHERE d.model_id = model) s;
        WITH numbered AS (SELECT u.sku, u.n::integer AS n FROM unnest(skus) WITH ORDINALITY AS u(sku, n))
        SELECT array_agg(na.n), array_agg(nb.n) INTO lefts, rights
        FROM duplicate_matches d JOIN numbered na ON na.sku = d.sku_a JOIN numbered nb ON nb.sku = d.sku_b
        WHERE d.model_id = model;
        parent := ARRAY(SELECT generate_series(1, cardinality(skus)));
        FOR i IN 1 .. cardinality(lefts) LOOP
            a := lefts[i];
            WHILE parent[a] <> a LOOP parent[a] := parent[parent[a]]; a := parent[a]; END LOOP;
            b := rights[i];
            WHILE parent[b] <> b LOOP parent[b] := parent[parent[b]]; b := parent[b]; END LOOP;
            -- The smaller number (earlier SKU) becomes the root, so components are numbered deterministically.
            IF a < b THEN parent[b] := a; ELSIF b < a THEN parent[a] := b; END IF;
        END LOOP;
        FOR i IN 1 .. cardinality(skus) LOOP
            a := i;
            WHILE parent[a] <> a LOOP a := parent[a]; END LOOP;
            model_id := model; sku := skus[i]; component := a;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$fn$
"""

NEAR_DUPLICATE_GROUPS = """
CREATE VIEW near_duplicate_groups AS
SELECT g.model_id, g.representative_sku, g.group_size, g.skus,
       d.pairs, d.min_similarity, d.max_similarity
FROM (
    SELECT c.model_id,
           -- the earliest listed product of the group, ties broken by SKU
           (array_agg(c.sku ORDER BY p.created_at, c.sku))[1] AS representative_sku,
           count(*)::integer AS group_size,
           array_agg(c.sku ORDER BY c.sku) AS skus
    FROM near_duplicate_components() c
    JOIN products p ON p.sku = c.sku
    GROUP BY c.model_id, c.component
) g
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS pairs, min(m.similarity) AS min_similarity, max(m.similarity) AS max_similarity
    FROM duplicate_matches m
    WHERE m.model_id = g.model_id AND m.sku_a = ANY (g.skus)
) d
"""

COMMENTS = {
    "VIEW current_tags": "tags in force, one row per product, attribute and value: machine tags accepted, tags a "
                         "person approved or set (a person''s tag hides the machine''s for that attribute); "
                         "is_main marks the one main value per attribute; confidence is the tag score",
    "VIEW current_tags_wide": "one row per product: its main tag of every attribute as a JSONB key of tags "
                              "({value, confidence, path, source, also}), plus category and category_path",
    "FUNCTION product_price(jsonb)": "the PIM price (attributes.price, a number or numeric string) as numeric, "
                                     "NULL when missing or not a number",
    "FUNCTION product_main_tags(text)": "{attribute: value} of the product''s main tags (current_tags.is_main)",
    "FUNCTION nearest_products(vector, integer, text, text, text, text, numeric, numeric, text, vector, integer)":
        "k nearest products to a query vector (cosine, HNSW index, iterative scans under filters); "
        "model_id NULL: the model that embedded a product most recently; embedding image, text or combined; "
        f"ef_search (default {DEFAULT_EF_SEARCH}) trades speed for recall",
    "FUNCTION similar_products(text, integer, boolean, double precision, text, text, boolean, numeric)":
        "the k products most similar to a stored product (SKU), most similar first, with their main tags; "
        "raises on an unknown SKU; model_id NULL: the model of the product''s most recent embedding",
    "FUNCTION products_like_label(text, text, text, integer, text, text)":
        "the k products nearest to a taxonomy label''s stored text embedding (current taxonomy version); "
        "tagged tells whether the product carries that tag now",
    "FUNCTION near_duplicate_components(text)": "(model_id, sku, component) of every SKU in a near-duplicate "
                                                "pair: connected components of duplicate_matches per model",
    "VIEW near_duplicate_groups": "connected groups of near-duplicate SKUs per model: representative_sku (earliest "
                                  "listed, then lowest SKU), group_size, skus, pairs, weakest and strongest pair",
}


def upgrade() -> None:
    op.execute(CURRENT_TAGS)
    op.execute(PRODUCT_PRICE)
    op.execute(CURRENT_TAGS_WIDE)
    op.execute(PRODUCT_MAIN_TAGS)
    op.execute(NEAREST_PRODUCTS)
    op.execute(SIMILAR_PRODUCTS)
    op.execute(PRODUCTS_LIKE_LABEL)
    op.execute(NEAR_DUPLICATE_COMPONENTS)
    op.execute(NEAR_DUPLICATE_GROUPS)
    for target, comment in COMMENTS.items():
        op.execute(f"COMMENT ON {target} IS '{comment}'")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS near_duplicate_groups")
    op.execute("DROP FUNCTION IF EXISTS near_duplicate_components(text)")
    op.execute("DROP FUNCTION IF EXISTS products_like_label(text, text, text, integer, text, text)")
    op.execute("DROP FUNCTION IF EXISTS similar_products(text, integer, boolean, double precision, text, text, "
               "boolean, numeric)")
    op.execute("DROP FUNCTION IF EXISTS nearest_products(vector, integer, text, text, text, text, numeric, numeric, "
               "text, vector, integer)")
    op.execute("DROP FUNCTION IF EXISTS product_main_tags(text)")
    op.execute("DROP VIEW IF EXISTS current_tags_wide")
    op.execute("DROP FUNCTION IF EXISTS product_price(jsonb)")
    op.execute("DROP VIEW IF EXISTS current_tags")
