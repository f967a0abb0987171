"""`tagger eval`: offline evaluation of zero-shot tagging, retrieval and near-duplicate detection."""
