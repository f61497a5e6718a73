import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from imagesieve._workspace import Workspace
from imagesieve.models import (
    BackboneConfig,
    MissingWeightsError,
    activate_version,
    active_version,
    create_backbone,
    get_backbone_spec,
    get_version,
    list_backbones,
    list_versions,
)
from imagesieve.models._version import new_build_dir, write_version
from imagesieve.models.export import export_onnx, make_model


def test_list_backbones__default_first_and_all_registered():
    assert list_backbones() == ["efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v2"]


def test_get_backbone_spec__unknown_name_lists_known():
    with pytest.raises(
        ValueError, match="unknown backbone 'vgg19'; known backbones: efficientnet_lite0, resnet18"
    ):
        get_backbone_spec("vgg19")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_create_backbone__missing_hub_weights_says_what_to_put_where(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as e:
        create_backbone(name)
    msg = str(e.value)
    assert msg.startswith(f"ImageNet weights for {name} not found: place {name}")
    assert f"in {tmp_path}/hub/checkpoints/" in msg
    assert "or pass --weights FILE" in msg


def test_create_backbone__hub_cache_file_is_used(tmp_path, monkeypatch):
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = tvm.resnet18(weights=None)
    target = (
        tmp_path / "hub" / "checkpoints" / tvm.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    )
    target.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), target)
    net = create_backbone("resnet18")
    assert torch.equal(net.imagenet_head.weight, ref.fc.weight)


def test_create_backbone__missing_weights_file():
    with pytest.raises(MissingWeightsError, match="weights file not found: /nonexistent.pth"):
        create_backbone("efficientnet_lite0", weights="/nonexistent.pth")


def _weights_file(name: str, tmp_path) -> str | None:
    """Local weights for torchvision backbones (random init saved to a file; no download here)."""
    if name == "efficientnet_lite0":
        return None
    import torchvision.models as tvm

    path = tmp_path / f"{name}.pth"
    torch.manual_seed(0)
    torch.save(getattr(tvm, name)(weights=None).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", list_backbones())
def test_export_onnx__matches_torch_for_every_backbone(name, tmp_path):
    backbone = create_backbone(name, weights=_weights_file(name, tmp_path))
    config = get_backbone_spec(name).config
    assert backbone.embed_dim == config.embed_dim
    model = make_model(backbone, torch.nn.Linear(config.embed_dim, 3)).eval()
    export_onnx(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, config.input_size, config.input_size, 3), dtype=np.uint8)
    with torch.no_grad():
        emb_t, logits_t = (t.numpy() for t in model(torch.from_numpy(x)))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    emb_o, logits_o = sess.run(["embedding", "logits"], {"image": x})
    assert emb_o.shape == (3, config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb_o, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb_o, emb_t, atol=1e-4)
    np.testing.assert_allclose(logits_o, logits_t, atol=1e-3, rtol=1e-3)


def test_export_onnx__ood_features_are_the_tapped_blocks_pooled_output(tmp_path):
    from imagesieve.models import OOD_FEATURES
    from imagesieve.models.export import model_outputs

    backbone = create_backbone("efficientnet_lite0")
    assert backbone.ood_taps == ("net._blocks.10", "net._blocks.14")  # 112 and 192 channels
    model = make_model(backbone, torch.nn.Linear(2 * 1280, 3), pooling="avgmax").eval()
    names = model_outputs(model)
    assert names == ("embedding", "logits", "avg_norm", "max_pooled", OOD_FEATURES)
    export_onnx(model, tmp_path / "m.onnx", names)
    x = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    grabbed = {}
    hooks = [
        backbone.body.net._blocks[i].register_forward_hook(
            lambda m, inp, o, i=i: grabbed.__setitem__(i, o)
        )
        for i in (10, 14)
    ]
    with torch.no_grad():
        emb_t, logits_t = (t.numpy() for t in model(torch.from_numpy(x)))
    for hook in hooks:
        hook.remove()
    taps = [grabbed[i].mean(dim=(2, 3)) for i in (10, 14)]
    want = np.concatenate([(t / t.norm(dim=1, keepdim=True)).numpy() for t in taps], 1)
    assert want.shape == (2, 112 + 192)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(names)
    emb_o, logits_o, _, _, ood_o = sess.run(None, {"image": x})
    np.testing.assert_allclose(ood_o, want, atol=1e-4)
    np.testing.assert_allclose(emb_o, emb_t, atol=1e-4)
    np.testing.assert_allclose(logits_o, logits_t, atol=1e-3, rtol=1e-3)
    # exporting leaves the model as it was (in eval mode): it gives the same outputs after
    assert not model.training
    # a backbone without a tap has no such output
    other = create_backbone("resnet18", weights=_weights_file("resnet18", tmp_path))
    assert other.ood_taps == ()
    assert OOD_FEATURES not in model_outputs(make_model(other, torch.nn.Linear(512, 3)))


def test_backbone_config__preprocess_keeps_square_images_whole():
    cfg = get_backbone_spec("efficientnet_lite0").config
    im = Image.new("RGB", (300, 300), (10, 20, 30))
    x = cfg.preprocess(im)
    assert x.shape == (224, 224, 3) and x.dtype == np.uint8
    assert tuple(x[0, 0]) == (10, 20, 30)


def test_backbone_config__center_crop_of_wide_image():
    cfg = get_backbone_spec("resnet18").config  # crop_pct 0.875: shorter side -> 256, crop 224
    a = np.zeros((256, 512, 3), np.uint8)
    a[:, 256 - 112 : 256 + 112] = 200  # the central 224 columns are bright
    x = cfg.preprocess(Image.fromarray(a))
    assert x.shape == (224, 224, 3)
    assert x[:, 2:-2].min() > 150


def test_backbone_config__dict_roundtrip():
    cfg = get_backbone_spec("mobilenet_v2").config
    assert BackboneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_versions__write_list_activate(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert list_versions(ws) == [] and active_version(ws) is None
    with pytest.raises(
        ValueError, match="no active model in workspace .*; run 'imagesieve train DATA_DIR' first"
    ):
        get_version(ws)
    names = []
    for _ in range(2):
        build = new_build_dir(ws)
        names.append(write_version(ws, build, {"classes": ["a", "b"], "preprocessing": {}}).name)
    assert names == ["v1", "v2"]
    assert not [p for p in ws.models_dir.iterdir() if p.name.startswith(".build-")]
    activate_version(ws, "v2")
    assert active_version(ws).name == "v2"
    with pytest.raises(ValueError, match=r"no model version 'v9' in .* \(versions: v1, v2\)"):
        activate_version(ws, "v9")
    assert os.path.exists(ws.models_dir / "v1" / "meta.json")
