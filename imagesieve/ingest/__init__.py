"""Ingestion: any pile of images (files, folders, zips, lists, URLs) scored into the store."""

from imagesieve.ingest._fetch import FetchOptions, fetch_items
from imagesieve.ingest._inputs import ArchiveLimits, InputError, InputItem, expand_inputs
from imagesieve.ingest._score import ScoreOptions, ScoreSummary, score_inputs
from imagesieve.ingest._session import ScoringSession, assign_unknowns

__all__ = [
    "ArchiveLimits",
    "FetchOptions",
    "InputError",
    "InputItem",
    "ScoreOptions",
    "ScoreSummary",
    "ScoringSession",
    "assign_unknowns",
    "expand_inputs",
    "fetch_items",
    "score_inputs",
]
