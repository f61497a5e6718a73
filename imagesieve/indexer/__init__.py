"""The sieve store: every scored image in DuckDB and FAISS, and the inputs that feed it."""

from imagesieve.indexer._fetch import FetchOptions, fetch_items
from imagesieve.indexer._inputs import InputError, InputItem, expand_inputs
from imagesieve.indexer._score import ScoreOptions, ScoreSummary, score_inputs, sort_into
from imagesieve.indexer._store import STORE_FILE, Failure, IndexCheck, Store, StoreBusyError
from imagesieve.indexer._vectors import VectorIndex

__all__ = [
    "STORE_FILE",
    "Failure",
    "FetchOptions",
    "IndexCheck",
    "InputError",
    "InputItem",
    "ScoreOptions",
    "ScoreSummary",
    "Store",
    "StoreBusyError",
    "VectorIndex",
    "expand_inputs",
    "fetch_items",
    "score_inputs",
    "sort_into",
]
