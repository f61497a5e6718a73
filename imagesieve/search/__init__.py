"""Finding things in the store: similar images, clusters of UNKNOWNs and their review."""

from imagesieve.search._cluster import (
    Cluster,
    Clustering,
    ClusterParams,
    assign_to_clusters,
    cluster_embeddings,
    match_clusters,
)
from imagesieve.search._review import (
    STATUSES,
    ClusterRun,
    PromoteResult,
    ReviewError,
    export_clusters,
    list_clusters,
    promote_cluster,
    run_clustering,
    update_cluster,
)
from imagesieve.search._similar import (
    SimilarError,
    SimilarQuery,
    SimilarResult,
    find_similar,
    nearest_stored,
)

__all__ = [
    "STATUSES",
    "Cluster",
    "ClusterParams",
    "ClusterRun",
    "Clustering",
    "PromoteResult",
    "ReviewError",
    "SimilarError",
    "SimilarQuery",
    "SimilarResult",
    "assign_to_clusters",
    "cluster_embeddings",
    "export_clusters",
    "find_similar",
    "list_clusters",
    "match_clusters",
    "nearest_stored",
    "promote_cluster",
    "run_clustering",
    "update_cluster",
]
