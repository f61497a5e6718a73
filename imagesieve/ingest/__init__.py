"""Ingestion: any pile of images (files, folders, zips, lists, URLs) scored into the store."""

from imagesieve.ingest._batches import (
    REPORT_FORMATS,
    batch_detail,
    batch_report,
    drift_history,
    drift_words,
    list_batches,
    report_media_type,
    write_batch_report,
)
from imagesieve.ingest._fetch import FetchOptions, fetch_items
from imagesieve.ingest._inputs import ArchiveLimits, InputError, expand_inputs
from imagesieve.ingest._ray import RayOptions
from imagesieve.ingest._score import (
    HISTORY_FILE,
    POOR_QUALITY_FOLDER,
    ScoreOptions,
    ScoreSummary,
    describe_history,
    history_clustering_words,
    read_history,
    score_history,
    score_inputs,
)
from imagesieve.ingest._session import ScoringSession

__all__ = [
    "REPORT_FORMATS",
    "batch_detail",
    "batch_report",
    "drift_history",
    "drift_words",
    "list_batches",
    "report_media_type",
    "write_batch_report",
    "HISTORY_FILE",
    "POOR_QUALITY_FOLDER",
    "ArchiveLimits",
    "FetchOptions",
    "InputError",
    "RayOptions",
    "ScoreOptions",
    "ScoreSummary",
    "ScoringSession",
    "expand_inputs",
    "describe_history",
    "history_clustering_words",
    "fetch_items",
    "read_history",
    "score_history",
    "score_inputs",
]
