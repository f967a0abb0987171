"""Zero-shot scoring: product embeddings against label prototypes, to tag decisions. Pure NumPy, no I/O.

For each attribute a label's prototype is the mean of its prompt embeddings (prompt ensembling,
as in CLIP). A product's score for a label is a softmax over the attribute's labels of
``logit_scale * cosine``; the cosine mixes image and product-text similarity by ``text_weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tagger import fewshot
from tagger.taxonomy.model import Attribute, TaxonomySet

ACCEPTED = "accepted"
NEEDS_REVIEW = "needs_review"
ALTERNATIVE = "alternative"  # a lower-ranked candidate kept for review, not a tag of the product


@dataclass(frozen=True)
class LabelPrototypes:
    """Unit-norm prototype vectors of one attribute's scored labels, in the order of ``keys``."""

    attribute: str
    keys: tuple[str, ...]
    vectors: np.ndarray  # (labels, dim) float32


@dataclass(frozen=True)
class TagDecision:
    taxonomy: str
    attribute: str
    value: str  # label key
    score: float
    rank: int  # 1 = best
    status: str
    path: str | None = None  # "apparel > topwear > shirts" for hierarchical attributes
    exemplars: int = 0  # the attribute's exemplars that contributed to the score (0: zero-shot only)


def prompt_plan(attribute: Attribute) -> tuple[list[str], np.ndarray]:
    """All prompt texts of an attribute's scored labels, and for each text the index of its label."""
    texts: list[str] = []
    owners: list[int] = []
    for index, label in enumerate(attribute.scored_labels):
        label_texts = label.prompt_texts(attribute.templates)
        texts.extend(label_texts)
        owners.extend([index] * len(label_texts))
    return texts, np.asarray(owners, dtype=np.int64)


def ensemble(text_vectors: np.ndarray, owners: np.ndarray, n_labels: int) -> np.ndarray:
    """Average each label's prompt embeddings and renormalise."""
    sums = np.zeros((n_labels, text_vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, text_vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def build_prototypes(taxonomies: TaxonomySet, encode_texts: Callable[[Sequence[str]], np.ndarray]) -> dict[str, LabelPrototypes]:
    """Prototypes for every attribute, embedding all prompts in one call."""
    plans = {a.name: prompt_plan(a) for a in taxonomies.attributes}
    all_texts = [text for texts, _ in plans.values() for text in texts]
    vectors = encode_texts(all_texts)
    result: dict[str, LabelPrototypes] = {}
    start = 0
    for attribute in taxonomies.attributes:
        texts, owners = plans[attribute.name]
        keys = tuple(label.key for label in attribute.scored_labels)
        chunk = vectors[start : start + len(texts)]
        start += len(texts)
        result[attribute.name] = LabelPrototypes(attribute.name, keys, ensemble(chunk, owners, len(keys)))
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def label_probabilities(
    image_vectors: np.ndarray,
    prototypes: np.ndarray,
    logit_scale: float,
    text_vectors: np.ndarray | None = None,
    text_weight: float = 0.0,
) -> np.ndarray:
    """(products, labels) probabilities; rows sum to one."""
    similarity = cosines(image_vectors, prototypes)
    if text_vectors is not None and text_weight > 0.0:
        similarity = (1.0 - text_weight) * similarity + text_weight * cosines(text_vectors, prototypes)
    return softmax(logit_scale * similarity)


def cosines(vectors: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(products, labels) dot products in float64. In float32 the result depends on how many products are scored
    together (BLAS kernels differ by shape), so a product scored alone and in a batch would store scores one ulp
    apart, and a redelivered event would rewrite its tags."""
    return np.asarray(vectors, dtype=np.float64) @ np.asarray(prototypes, dtype=np.float64).T


def applies(attribute: Attribute, taxonomies: TaxonomySet, chosen: dict[str, str]) -> bool:
    """Whether an attribute's ``applies_to`` conditions hold, given the top label already chosen per attribute."""
    for condition, keys in attribute.applies_to.items():
        top = chosen.get(condition)
        if top is None:
            return False
        ancestors = taxonomies.attribute(condition).ancestors(top)
        if not set(keys) & set(ancestors):
            return False
    return True


def decide(attribute: Attribute, keys: Sequence[str], probabilities: np.ndarray, default_threshold: float,
           default_top_k: int, exemplars: int = 0) -> list[TagDecision]:
    """Tag decisions for one product and one attribute from its label probabilities."""
    threshold = attribute.threshold if attribute.threshold is not None else default_threshold
    top_k = min(attribute.top_k or default_top_k, len(keys))
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    decisions: list[TagDecision] = []
    for rank, index in enumerate(order, start=1):
        key = keys[int(index)]
        score = float(probabilities[int(index)])
        label_threshold = attribute.label(key).threshold
        needed = label_threshold if label_threshold is not None else threshold
        if score >= needed and (rank == 1 or attribute.kind == "multi"):
            status = ACCEPTED
        elif rank == 1:
            status = NEEDS_REVIEW
        else:
            status = ALTERNATIVE
        path = attribute.path(key) if attribute.hierarchical else None
        decisions.append(TagDecision(attribute.taxonomy, attribute.name, key, score, rank, status, path, exemplars))
    return decisions


def decide_many(attribute: Attribute, keys: Sequence[str], probabilities: np.ndarray, default_threshold: float,
                default_top_k: int, exemplars: np.ndarray | None = None) -> list[list[TagDecision]]:
    """``decide`` for many products at once (rows of ``probabilities``), with the same results: one NumPy sort
    for the batch instead of a sort and label lookups per product (re-tagging 100k products is bound by this)."""
    n = probabilities.shape[0]
    if n == 0:
        return []
    threshold = attribute.threshold if attribute.threshold is not None else default_threshold
    top_k = min(attribute.top_k or default_top_k, len(keys))
    needed = np.array([attribute.label(key).threshold if attribute.label(key).threshold is not None else threshold
                       for key in keys], dtype=np.float64)
    paths = [attribute.path(key) if attribute.hierarchical else None for key in keys]
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    scores = np.take_along_axis(probabilities, order, axis=1).astype(np.float64)
    passes = scores >= needed[order]
    status = np.where(passes, ACCEPTED, ALTERNATIVE).astype(object)
    if attribute.kind != "multi":
        status[:, 1:] = ALTERNATIVE
    status[:, 0] = np.where(passes[:, 0], ACCEPTED, NEEDS_REVIEW)
    used = exemplars.tolist() if exemplars is not None else [0] * n
    taxonomy, name = attribute.taxonomy, attribute.name
    return [[TagDecision(taxonomy, name, keys[j], score, rank, st, paths[j], int(ex))
             for rank, (j, score, st) in enumerate(zip(row_order, row_scores, row_status), start=1)]
            for row_order, row_scores, row_status, ex in zip(order.tolist(), scores.tolist(), status.tolist(), used)]


def attribute_probabilities(
    attribute: Attribute,
    proto: LabelPrototypes,
    image_vectors: np.ndarray,
    logit_scale: float,
    *,
    text_vectors: np.ndarray | None = None,
    text_weight: float = 0.0,
    image_features: np.ndarray | None = None,
    exemplars: fewshot.AttributeExemplars | None = None,
    params: fewshot.FewShotParams | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One attribute's (products, labels) probabilities, the exemplars used per product, and which products
    could be scored. Without exemplars and without exemplar-only labels this is exactly ``label_probabilities``."""
    n = image_vectors.shape[0]
    prompted = np.array([not attribute.label(key).exemplar_only for key in proto.keys], dtype=bool)
    prepared = fewshot.prepare(exemplars, proto.keys) if exemplars is not None and len(exemplars) else None
    if prepared is None and prompted.all():
        probabilities = label_probabilities(image_vectors, proto.vectors, logit_scale, text_vectors, text_weight)
        return probabilities, np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    similarity = cosines(image_vectors, proto.vectors)
    if text_vectors is not None and text_weight > 0.0:
        similarity = (1.0 - text_weight) * similarity + text_weight * cosines(text_vectors, proto.vectors)
    zero_shot_logits = logit_scale * similarity
    params = params or fewshot.FewShotParams()
    if prepared is not None and exemplars is not None and params.fit and exemplars.embeddings is not None:
        params = fewshot.fit(_exemplar_zero_shot_logits(exemplars, prepared.rows, proto, logit_scale, text_weight),
                             prepared, exemplars.features[prepared.rows], prepared.owners, params, prompted)
    return fewshot.probabilities(zero_shot_logits, prepared, image_features, params, prompted)


def _exemplar_zero_shot_logits(exemplars: fewshot.AttributeExemplars, rows: np.ndarray, proto: LabelPrototypes,
                               logit_scale: float, text_weight: float) -> np.ndarray:
    """The zero-shot logits of the exemplar products themselves, mixed with their text as products are."""
    assert exemplars.embeddings is not None
    similarity = (exemplars.embeddings[rows] @ proto.vectors.T).astype(np.float64)
    if exemplars.text_embeddings is not None and text_weight > 0.0:
        texts = exemplars.text_embeddings[rows]
        has = np.isfinite(texts).all(axis=1)
        similarity[has] = (1.0 - text_weight) * similarity[has] + text_weight * (texts[has] @ proto.vectors.T)
    return logit_scale * similarity


def tag_products(
    taxonomies: TaxonomySet,
    prototypes: dict[str, LabelPrototypes],
    image_vectors: np.ndarray,
    logit_scale: float,
    *,
    text_vectors: np.ndarray | None = None,
    text_weight: float = 0.0,
    default_threshold: float = 0.5,
    default_top_k: int = 3,
    attributes: Sequence[str] | None = None,
    image_features: np.ndarray | None = None,
    exemplars: Mapping[str, fewshot.AttributeExemplars] | None = None,
    fewshot_params: fewshot.FewShotParams | None = None,
) -> list[list[TagDecision]]:
    """Tag decisions for a batch of products, attribute by attribute in dependency order.

    ``attributes`` restricts which attributes are returned (conditions are still evaluated).
    ``image_features`` (products, d) backbone features, a NaN row for a product without stored features, and
    ``exemplars`` per attribute name add few-shot scoring (``tagger.fewshot``); each decision records how many
    exemplars contributed. Without them the decisions are exactly the zero-shot ones.
    """
    n = image_vectors.shape[0]
    results: list[list[TagDecision]] = [[] for _ in range(n)]
    chosen: list[dict[str, str]] = [{} for _ in range(n)]
    wanted = set(attributes) if attributes is not None else None
    for attribute in taxonomies.attributes:
        proto = prototypes[attribute.name]
        probabilities, used, scored = attribute_probabilities(
            attribute, proto, image_vectors, logit_scale, text_vectors=text_vectors, text_weight=text_weight,
            image_features=image_features, exemplars=(exemplars or {}).get(attribute.name), params=fewshot_params)
        if attribute.applies_to:
            rows = [row for row in range(n) if scored[row] and applies(attribute, taxonomies, chosen[row])]
        else:  # unconditional: no per-product check
            rows = np.flatnonzero(scored).tolist()
        batch = decide_many(attribute, proto.keys, probabilities[rows], default_threshold, default_top_k, used[rows])
        for row, decisions in zip(rows, batch, strict=True):
            chosen[row][attribute.name] = decisions[0].value
            if wanted is None or attribute.name in wanted:
                results[row].extend(decisions)
    return results
