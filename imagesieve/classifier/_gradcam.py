"""Grad-CAM: where a model version looked when it scored an image. Torch is imported lazily."""

from __future__ import annotations

import functools
import io
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imagesieve._errors import UserError
from imagesieve.data import ImageSource, load_image
from imagesieve.models import ModelVersion

__all__ = ["TARGET_LAYER", "GradCam", "grad_cam"]

log = logging.getLogger(__name__)

#: The module of ``SieveModel`` whose output Grad-CAM explains, the same for every backbone:
#: ``Backbone.body`` ends at the last convolutional feature map, just before global pooling
#: (EfficientNet-Lite0: head conv + BN + ReLU6; ResNet: ``layer4``; MobileNetV2: the final
#: 1x1 conv of ``features``), all (n, d, 7, 7) at 224 px.
TARGET_LAYER = "backbone.body"

#: Classes named in the "unknown class" message before it is cut short (ImageNet has 1,000).
_MAX_LISTED_CLASSES = 30


@dataclass
class GradCam:
    """Grad-CAM of one class on one image.

    ``heatmap`` is (H, W) float32 in [0, 1] at the size of the image given; the parts the
    model never saw (cut off by the centre crop) are 0.
    """

    class_name: str
    probability: float
    heatmap: np.ndarray

    def overlay(self, image: Image.Image, alpha: float = 0.45) -> Image.Image:
        """The heatmap in a jet-like colour map blended on ``image`` (RGB, same size as ``image``)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}")
        rgb = image.convert("RGB")
        heat = self.heatmap
        if rgb.size != (heat.shape[1], heat.shape[0]):  # e.g. a thumbnail of the scored image
            heat = np.asarray(
                Image.fromarray(heat.astype(np.float32), "F").resize(
                    rgb.size, Image.Resampling.BILINEAR
                )
            )
        colour = _jet(np.clip(heat, 0.0, 1.0)) * 255.0
        blended = (1.0 - alpha) * np.asarray(rgb, np.float32) + alpha * colour
        return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")


def _jet(x: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) RGB in [0, 1]: blue, cyan, yellow, red (like jet)."""
    x = x[..., None] * 4.0
    return np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0)


@dataclass(frozen=True)
class _CamModel:
    """A version's torch model, frozen, with a lock: its hook must not see other calls' passes."""

    model: Any
    classes: list[str]
    lock: threading.Lock


#: (checkpoint, mtime) of the models ``_cam_model`` has loaded (a hint for progress messages).
_LOADED: set[tuple[str, int]] = set()


@functools.lru_cache(maxsize=2)
def _cam_model(checkpoint: str, mtime_ns: int) -> _CamModel:
    """Load a checkpoint once per file version (``mtime_ns`` is part of the cache key)."""
    from imagesieve.models.export import load_checkpoint

    model, classes = load_checkpoint(checkpoint)
    for p in model.parameters():  # gradients are needed w.r.t. the feature map only
        p.requires_grad_(False)
    log.info("loaded %s for Grad-CAM", checkpoint)
    _LOADED.add((checkpoint, mtime_ns))
    return _CamModel(model.eval(), classes, threading.Lock())


def _as_source(image: ImageSource | Image.Image) -> ImageSource:
    """A PIL image as lossless bytes, so it is decoded exactly like an uploaded file."""
    if not isinstance(image, Image.Image):
        return image
    buf = io.BytesIO()
    try:
        image.save(buf, "PNG", compress_level=0)  # speed over size: bytes never leave
    except (OSError, KeyError):  # modes PNG cannot store (F, CMYK, ...)
        buf = io.BytesIO()
        image.save(buf, "TIFF")
    return buf.getvalue()


def _bilinear_matrix(n_out: int, n_cells: int, start: float, length: float) -> np.ndarray:
    """(n_out, n_cells) bilinear weights: ``n_cells`` equal cells span [start, start + length).

    Sampling at pixel centres with edge cells held (``align_corners=False``); rows of pixels
    outside the span are 0.
    """
    p = np.arange(n_out) + 0.5
    t = np.clip((p - start) * (n_cells / length) - 0.5, 0.0, n_cells - 1)
    j0 = np.floor(t).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_cells - 1)
    frac = t - j0
    m = np.zeros((n_out, n_cells), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, j0), 1.0 - frac)
    np.add.at(m, (rows, j1), frac)
    m[(p < start) | (p >= start + length)] = 0.0
    return m


def _cam(cm: _CamModel, x: np.ndarray, class_index: int | None) -> tuple[np.ndarray, int, float]:
    """(s, s, 3) uint8 pixels -> ((h, w) Grad-CAM >= 0, class index, its probability)."""
    import torch

    captured = []

    def keep_feature_map(module, inputs, output):
        # A leaf that requires grad: backward stops here instead of running through the backbone.
        fmap = output.detach().requires_grad_(True)
        captured.append(fmap)
        return fmap

    with cm.lock, torch.enable_grad():
        handle = cm.model.get_submodule(TARGET_LAYER).register_forward_hook(keep_feature_map)
        try:
            _, logits = cm.model(torch.from_numpy(np.array(x[None])))  # a writable copy
        finally:
            handle.remove()
        (fmap,) = captured
        assert fmap.ndim == 4, f"{TARGET_LAYER} gave a {fmap.ndim}-D tensor, not a feature map"
        c = int(logits[0].argmax()) if class_index is None else class_index
        (grad,) = torch.autograd.grad(logits[0, c], fmap)
    with torch.no_grad():
        weights = grad[0].mean(dim=(1, 2))  # (d,): spatial mean of d logit_c / dA
        cam = torch.relu(torch.einsum("d,dhw->hw", weights, fmap[0]))
        prob = float(torch.softmax(logits[0].double(), 0)[c])
    return cam.double().numpy(), c, prob


def grad_cam_loaded(version: ModelVersion) -> bool:
    """True when ``version``'s Grad-CAM model is in memory (the next one is quick)."""
    ckpt = version.checkpoint_path
    if not ckpt.is_file():
        return False
    key = (str(ckpt), ckpt.stat().st_mtime_ns)
    return key in _LOADED


def grad_cam(
    version: ModelVersion, image: ImageSource | Image.Image, class_name: str | None = None
) -> GradCam:
    """Grad-CAM of ``class_name`` (default: the Top-1 class) on the backbone's last feature map.

    The image is decoded and preprocessed exactly as for scoring (``load_image``, then the
    version's resize and centre crop); the heatmap is mapped back onto the image given.
    Unknown class names raise ``ValueError`` listing the version's classes.
    """
    classes = version.classes
    class_index = None
    if class_name is not None:
        if class_name not in classes:
            listed = ", ".join(classes[:_MAX_LISTED_CLASSES])
            if len(classes) > _MAX_LISTED_CLASSES:
                listed += f", ... ({len(classes)} in all)"
            raise UserError(
                f"unknown class {class_name!r} for model version {version.name}; classes: {listed}"
            )
        class_index = classes.index(class_name)

    ckpt = version.checkpoint_path
    if not ckpt.is_file():
        raise UserError(f"model version {version.name} has no torch checkpoint ({ckpt})")

    config = version.config
    decoded = load_image(_as_source(image), min_side=config.resize_side)
    width, height = (
        image.size if isinstance(image, Image.Image) else (decoded.width, decoded.height)
    )
    x = config.preprocess(decoded.image)

    cm = _cam_model(str(ckpt), ckpt.stat().st_mtime_ns)
    assert cm.classes == classes, f"{ckpt} classes differ from {version.name}'s meta.json"
    cam, c, prob = _cam(cm, x, class_index)

    # The model saw a centre crop of side s of the decoded image (shorter side resize_side):
    # map that square back onto the original's pixel grid, one bilinear step per axis.
    w, h = decoded.image.size
    s = config.input_size
    left, top = (w - s) // 2, (h - s) // 2
    assert np.array_equal(x, np.asarray(decoded.image)[top : top + s, left : left + s]), (
        "crop box differs from BackboneConfig.resize_and_crop"
    )
    sx, sy = width / w, height / h
    rows = _bilinear_matrix(height, cam.shape[0], top * sy, s * sy)
    cols = _bilinear_matrix(width, cam.shape[1], left * sx, s * sx)
    heat = (rows @ cam).astype(np.float32) @ cols.T.astype(np.float32)  # (H, W), float32 only
    peak = float(heat.max(initial=0.0))
    if peak > 0.0:
        heat /= peak
    return GradCam(classes[c], prob, np.clip(heat, 0.0, 1.0, out=heat))
