"""tagger: catalog auto-tagging for fashion retail.

Product events in; image and text embeddings in Postgres/pgvector, zero-shot tags and near-duplicate
SKU matches out. See README.md.
"""

__version__ = "0.1.0"
