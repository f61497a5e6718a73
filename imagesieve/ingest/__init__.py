"""Ingestion: any pile of images (files, folders, zips, lists, URLs) scored into the store."""

from imagesieve.ingest._fetch import FetchOptions, fetch_items
from imagesieve.ingest._inputs import ArchiveLimits, InputError, expand_inputs
from imagesieve.ingest._score import ScoreOptions, ScoreSummary, score_inputs
from imagesieve.ingest._session import ScoringSession

__all__ = [
    "ArchiveLimits",
    "FetchOptions",
    "InputError",
    "ScoreOptions",
    "ScoreSummary",
    "ScoringSession",
    "expand_inputs",
    "fetch_items",
    "score_inputs",
]
