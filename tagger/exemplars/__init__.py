"""Exemplars: a shop's labelled examples per attribute label, and the `tagger exemplars` commands.

``validate`` (pure): reading an import file, checking each row, finding contradicting exemplars.
``commands``: the CLI, at the edge (database, re-tagging).
"""
