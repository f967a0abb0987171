"""Celery app and tasks: thin wrappers around ``tagger.pipeline``."""
