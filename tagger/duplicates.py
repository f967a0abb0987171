"""Near-duplicate rules (pure): which nearest neighbours count as the same product.

The candidates come from the pgvector index (``db.repository.nearest_images``); a pair is a
near-duplicate when the cosine similarity of the two image embeddings reaches the threshold
(``TAGGER_DUPLICATE_THRESHOLD``; ``tagger eval duplicates`` suggests a value for a model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DuplicatePair:
    """One unordered pair, stored once with ``sku_a < sku_b``."""

    sku_a: str
    sku_b: str
    similarity: float

    @classmethod
    def of(cls, sku: str, other: str, similarity: float) -> DuplicatePair:
        if sku == other:
            raise ValueError("a product is not its own duplicate")
        first, second = sorted((sku, other))
        return cls(first, second, similarity)

    def other(self, sku: str) -> str:
        return self.sku_b if sku == self.sku_a else self.sku_a


def select_duplicates(sku: str, neighbours: Iterable[tuple[str, float]], threshold: float) -> list[DuplicatePair]:
    """Pairs of ``sku`` with every neighbour at or above ``threshold`` similarity, most similar first."""
    pairs: dict[str, DuplicatePair] = {}
    for other, similarity in neighbours:
        if other == sku or similarity < threshold:
            continue
        if other not in pairs or similarity > pairs[other].similarity:  # a repeated neighbour keeps its best score
            pairs[other] = DuplicatePair.of(sku, other, min(similarity, 1.0))
    return sorted(pairs.values(), key=lambda p: (-p.similarity, p.sku_a, p.sku_b))
