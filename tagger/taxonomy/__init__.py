"""Merchandiser-edited taxonomies: schema, loading and validation (pure, no database)."""

from tagger.taxonomy.loader import TaxonomyValidationError, load_taxonomies, validate_taxonomies
from tagger.taxonomy.model import Attribute, Label, Taxonomy, TaxonomySet

__all__ = ["Attribute", "Label", "Taxonomy", "TaxonomySet", "TaxonomyValidationError", "load_taxonomies",
           "validate_taxonomies"]
