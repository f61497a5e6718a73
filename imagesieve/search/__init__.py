"""Finding things in the store: similar images, clusters of UNKNOWNs and their review."""

from imagesieve.search._cluster import Cluster, ClusterModel, ClusterParams, assign_to_clusters
from imagesieve.search._review import (
    ClusterRun,
    PromoteResult,
    ReviewError,
    cluster_model_path,
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
    "Cluster",
    "ClusterModel",
    "ClusterParams",
    "ClusterRun",
    "PromoteResult",
    "ReviewError",
    "SimilarError",
    "SimilarQuery",
    "SimilarResult",
    "assign_to_clusters",
    "cluster_model_path",
    "find_similar",
    "list_clusters",
    "nearest_stored",
    "promote_cluster",
    "run_clustering",
    "update_cluster",
]
