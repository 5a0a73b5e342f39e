"""Curation of text-to-image preference pairs: ingest, score, and Multi-Preference Consistent Filtering (MPCF)."""
