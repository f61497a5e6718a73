"""Backbones (one registry, one factory), their preprocessing, and model versions.

Importing this package does not import torch; ``imagesieve.models.export`` (checkpoints and
the ONNX export) does.
"""

from imagesieve.models._config import BackboneConfig
from imagesieve.models._registry import (
    BackboneSpec,
    MissingWeightsError,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from imagesieve.models._version import (
    FAR_FILE,
    HISTORY_FILE,
    ModelVersion,
    VersionMeta,
    activate_version,
    active_stamp,
    active_version,
    discard_build_dir,
    get_version,
    list_versions,
    new_build_dir,
    read_history,
    set_thresholds,
    write_version,
)

DEFAULT_BACKBONE = "efficientnet_lite0"
#: The ONNX output of a version whose backbone has ``ood_taps``: the tapped blocks'
#: average-pooled features, each unit length, concatenated: what its far-from-training
#: distance reads.
OOD_FEATURES = "ood_features"

__all__ = [
    "DEFAULT_BACKBONE",
    "FAR_FILE",
    "HISTORY_FILE",
    "OOD_FEATURES",
    "BackboneConfig",
    "BackboneSpec",
    "MissingWeightsError",
    "ModelVersion",
    "VersionMeta",
    "activate_version",
    "active_stamp",
    "active_version",
    "discard_build_dir",
    "create_backbone",
    "get_backbone_spec",
    "get_version",
    "list_backbones",
    "list_versions",
    "new_build_dir",
    "read_history",
    "register_backbone",
    "set_thresholds",
    "write_version",
]
