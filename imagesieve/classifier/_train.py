"""Training: phase 1 fits the head on cached frozen-backbone features; phase 2 fine-tunes."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve._workspace import Workspace
from imagesieve.classifier._engine import Progress
from imagesieve.classifier._far import FAR_COSINE, FAR_MAHALANOBIS, FarFeatures
from imagesieve.classifier._features import HEAD_POOLING, backbone_onnx, extract_features
from imagesieve.classifier._leakage import find_training_duplicates, training_copies
from imagesieve.classifier._openset import (
    HeldOut,
    Refit,
    held_out,
    new_types,
    report_card,
    save_calibration,
)
from imagesieve.classifier._predict import softmax
from imagesieve.classifier._quality import QualityRule, calibrate_quality, quality_columns
from imagesieve.classifier._reference import DEFAULT_FALSE_UNKNOWN_RATE, ReferenceSet
from imagesieve.classifier._split import SplitPlan, adaptive_split
from imagesieve.data import ImageFolder, load_image, scan_image_folder
from imagesieve.models import (
    DEFAULT_BACKBONE,
    OOD_FEATURES,
    ModelVersion,
    activate_version,
    get_backbone_spec,
)

__all__ = ["TrainOptions", "TrainResult", "train_model"]

log = logging.getLogger(__name__)


CLASS_WEIGHTS = ("sqrt", "balanced", "none")
FLIPS = ("horizontal", "all", "none")
#: Per-step decay of the fine-tuned weights' moving average (a horizon of ~50 steps).
EMA_DECAY = 0.98
WEIGHT_DECAYS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")


def _new_history() -> dict[str, list[float]]:
    """Empty training curves: one value per epoch (or L-BFGS step) under each of CURVES."""
    return {k: [] for k in CURVES}


@dataclass
class TrainOptions:
    """Everything ``imagesieve train`` can set; stored in the version's ``meta.json``."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    patience: int = 3
    #: Phase-2 flips: "horizontal", "all" (no up or down) or "none" (text, digits, dials).
    flips: str = "horizontal"
    test_size: float = 0.2
    val_size: float = 0.1
    class_weight: str = "sqrt"
    confidence_threshold: float = 0.5
    false_unknown_rate: float = DEFAULT_FALSE_UNKNOWN_RATE
    batch_size: int = 32
    seed: int = 0
    activate: bool = True
    #: An operator's photo quality bounds over the calibrated ones (``QualityRule`` field ->
    #: value; None switches a check off).
    quality: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_backbone_spec(self.backbone)  # unknown names fail here with the list of known ones
        if self.class_weight not in CLASS_WEIGHTS:
            raise UserError(
                f"class weight must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r}"
            )
        if self.flips not in FLIPS:
            raise UserError(f"flips must be one of {', '.join(FLIPS)}, got {self.flips!r}")
        if self.patience < 1:
            raise UserError(f"patience must be >= 1, got {self.patience}")
        if self.finetune_epochs < 0:
            raise UserError(f"finetune epochs must be >= 0, got {self.finetune_epochs}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise UserError(
                f"confidence threshold must be within [0, 1], got {self.confidence_threshold}"
            )
        if not 0.0 < self.false_unknown_rate < 1.0:
            raise UserError(
                f"false-UNKNOWN rate must be within (0, 1), got {self.false_unknown_rate}"
            )
        try:
            QualityRule().with_overrides(self.quality)
        except ValueError as e:
            raise UserError(str(e)) from None

    @classmethod
    def from_version(cls, version: ModelVersion | None, **given: Any) -> TrainOptions:
        """The options ``version`` was trained with and its confidence threshold, then ``given``.

        So a retrain keeps what the operator chose (backbone, fine-tuning, the UNKNOWN target,
        a confidence threshold set in the Model tab and photo quality bounds) unless told
        otherwise. The threshold asked for counts, not one calibration lowered. Thresholds an
        operator had calibrated for another rate (``thresholds.target``) carry that rate, with
        the confidence training was asked for. Without a trained version: defaults.
        """
        base: dict[str, Any] = {}
        if version is not None and version.meta.get("kind") == "trained":
            known = {f.name for f in fields(cls)} - {"activate"}
            stored = version.meta.get("training", {}).get("options", {})
            base = {k: v for k, v in stored.items() if k in known}
            th = version.meta.get("thresholds", {})
            asked = th.get("calibration", {}).get("confidence_requested")
            if th.get("target"):  # the operator's rate: calibrated again at it
                base["false_unknown_rate"] = th["target"]
                asked = base.get("confidence_threshold", asked)
            elif version.thresholds_tuned or asked is None:
                asked = th.get("confidence", 0.5)
            base["confidence_threshold"] = asked if asked is not None else th.get("confidence", 0.5)
            base["quality"] = dict(version.meta.get("quality_overrides") or {})
        return cls(**(base | given))


@dataclass
class TrainResult:
    """The new version, its test metrics and the files that were left out."""

    version: ModelVersion
    metrics: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _class_weights(y: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights (inverse frequency, its square root, or none), mean 1 per sample."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.ones(n_classes) if mode == "none" else 1.0 / np.maximum(counts, 1)
    if mode == "sqrt":
        w = np.sqrt(w)
    w *= counts.sum() / (w * counts).sum()
    return w.astype(np.float32)


def _holdout(
    y: np.ndarray, idx: np.ndarray, share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (fit, check), stratified, for choosing hyper-parameters when no val exists."""
    rng = np.random.default_rng(seed + 1)
    fit, check = [], []
    for c in np.unique(y[idx]):
        members = rng.permutation(idx[y[idx] == c])
        k = int(round(len(members) * share)) if len(members) >= 5 else 0
        check.append(members[:k])
        fit.append(members[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(check))


def _fit_linear(x, y, xv, yv, n_classes, class_w, weight_decay, steps=30, init=None):
    """L2-regularised multinomial logistic regression by full-batch L-BFGS (convex: converges).

    Records train/val loss and accuracy after each of ``steps`` L-BFGS steps (10 iterations
    each) as the training curve; returns the fitted layer, final val loss and history.
    ``init`` (weight, bias) starts from a nearby solution instead of zeros.
    """
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xvt, yvt = torch.from_numpy(xv), torch.from_numpy(yv)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.zeros_like(lin.weight) if init is None else init[0])
        lin.bias.copy_(torch.zeros_like(lin.bias) if init is None else init[1])
    opt = torch.optim.LBFGS(
        lin.parameters(), lr=1, max_iter=10, history_size=20, line_search_fn="strong_wolfe"
    )
    cw = torch.from_numpy(class_w)

    def closure():
        opt.zero_grad()
        loss = (
            F.cross_entropy(lin(xt), yt, weight=cw) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        )
        loss.backward()
        return loss

    hist = _new_history()
    val_loss = float("nan")
    for _ in range(steps):
        opt.step(closure)
        with torch.no_grad():
            logits = lin(xt)
            hist["train_loss"].append(float(F.cross_entropy(logits, yt)))
            hist["train_acc"].append(float((logits.argmax(1) == yt).float().mean()))
            if len(yv):
                vl = lin(xvt)
                val_loss = float(F.cross_entropy(vl, yvt))
                hist["val_loss"].append(val_loss)
                hist["val_acc"].append(float((vl.argmax(1) == yvt).float().mean()))
    return lin, val_loss, hist


#: L-BFGS steps (10 iterations each) of a refit: its Top-1 probabilities' quantiles match those
#: of 30 steps to 3 decimals on digits and shapes (the 30 steps are for the training curve).
REFIT_STEPS = 5


def _refit_top1(
    feats: np.ndarray, y: np.ndarray, train: np.ndarray, head: Any, opts: TrainOptions, wd: float
) -> Refit:
    """Phase 1 again on some rows only: every row's Top-1 probability (``_openset.Refit``).

    Features are standardised as for the trained head (its weights brought back to that
    scale), so a warm refit starts next to its optimum and needs few steps.
    """
    import torch

    mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-6
    z = torch.from_numpy(((feats - mu) / sd).astype(np.float32))
    with torch.no_grad():
        weight = head.weight * torch.from_numpy(sd)
        bias = head.bias + head.weight @ torch.from_numpy(mu)

    def refit(rows: np.ndarray, warm: bool) -> np.ndarray:
        present = np.unique(y[rows])
        if len(present) < 2:
            return np.ones(len(y))
        remap = np.zeros(int(y.max()) + 1, np.int64)
        remap[present] = np.arange(len(present))
        yy = remap[y]
        cw = _class_weights(yy[rows], len(present), opts.class_weight)
        keep = torch.from_numpy(present)
        x = z[rows].numpy()
        init = (weight[keep], bias[keep]) if warm else None
        lin, _, _ = _fit_linear(x, yy[rows], x[:0], yy[:0], len(present), cw, wd, REFIT_STEPS, init)
        with torch.no_grad():
            return softmax(lin(z).numpy()).max(1)

    return refit


def _fit_head(feats, y, train, val, n_classes, opts: TrainOptions):
    """Phase 1: choose weight decay on validation loss, fold standardisation into the head."""
    import torch

    val_source = "val split"
    fit_idx = train
    if len(val) == 0:
        fit_idx, val = _holdout(y, train, 0.2, opts.seed)
        val_source = "20% hold-out of train (refit on all of train)"
    mu = feats[fit_idx].mean(0)
    sd = feats[fit_idx].std(0) + 1e-6
    z = (feats - mu) / sd
    cw = _class_weights(y[train], n_classes, opts.class_weight)
    trials = []
    for wd in WEIGHT_DECAYS:
        lin, vloss, hist = _fit_linear(z[fit_idx], y[fit_idx], z[val], y[val], n_classes, cw, wd)
        trials.append((vloss if np.isfinite(vloss) else 0.0, wd, lin, hist))
    vloss, wd, lin, hist = min(trials, key=lambda t: t[0])
    if fit_idx is not train:  # refit on all training images with the chosen weight decay
        mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-6
        z = (feats - mu) / sd
        lin, _, _ = _fit_linear(z[train], y[train], z[:0], y[:0], n_classes, cw, wd)
    head = torch.nn.Linear(feats.shape[1], n_classes)
    with torch.no_grad():  # logits = W (f - mu) / sd + b  ==  (W / sd) f + (b - W mu / sd)
        w = lin.weight / torch.from_numpy(sd)
        head.weight.copy_(w)
        head.bias.copy_(lin.bias - w @ torch.from_numpy(mu))
    info = {
        "weight_decay": wd,
        "val_loss": round(float(vloss), 5),
        "selected_on": val_source,
        "class_weight": opts.class_weight,
        "weight_decay_trials": {str(t[1]): round(float(t[0]), 5) for t in trials},
    }
    return head, info, hist


def _augment_transform(size: int, flips: str = "horizontal"):
    """Mild augmentation for zoom, angle, lighting and blur, plus the flips the images allow.

    Strong crops would cut defects out of "defective" images and teach label noise.
    ``flips="all"`` adds vertical flips and quarter turns (the 8 symmetries of a square), for
    images with no up or down: cells, tiles, micrographs, aerial views; ``flips="none"`` keeps
    every image the way round it was taken, for what a mirror changes: text, digits, dials.
    """
    import torch
    from torchvision.transforms import v2

    class QuarterTurn(torch.nn.Module):
        def forward(self, x):
            k = int(torch.randint(4, ()))
            return v2.functional.rotate(x, 90 * k) if k else x

    symmetries = [] if flips == "none" else [v2.RandomHorizontalFlip()]
    if flips == "all":
        symmetries += [v2.RandomVerticalFlip(), QuarterTurn()]
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),  # zoom
            *symmetries,
            v2.RandomApply([v2.RandomRotation(10)], p=0.3),  # camera angle
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),  # lighting
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.0))], p=0.2),  # blur / focus
        ]
    )


def _finetune(model, images, y, train, val, n_classes, opts: TrainOptions, progress: Progress):
    """Phase 2: train the backbone's last stage and the head with augmentation; keep the best epoch.

    The whole model stays in eval mode: BatchNorm keeps its ImageNet statistics (small CPU
    batches would make them noisy and shift the features the phase-1 head was fitted on).
    """
    import torch
    from torch.nn import functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    config = get_backbone_spec(opts.backbone).config
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    aug = _augment_transform(config.input_size, opts.flips)
    for p in model.parameters():
        p.requires_grad_(False)
    tail = model.backbone.tail_modules()
    tail_params = [p for m in tail for p in m.parameters()]
    for p in [*tail_params, *model.head.parameters()]:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(
        [
            {"params": tail_params, "lr": opts.finetune_lr},
            {"params": model.head.parameters(), "lr": opts.finetune_lr * 10},
        ],
        weight_decay=1e-4,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        optim, T_max=max(1, opts.finetune_epochs * -(-len(train) // opts.batch_size))
    )
    cw = torch.from_numpy(_class_weights(y[train], n_classes, opts.class_weight))
    model = model.to(memory_format=torch.channels_last)
    val_x = (
        torch.from_numpy(np.stack([config.preprocess(images[i]) for i in val]))
        if len(val)
        else None
    )
    # Validation and the kept checkpoint use an exponential moving average of the weights:
    # smoother than the last step's weights on a few thousand noisy, augmented images.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
    hist = _new_history()
    best = (-1.0, copy.deepcopy(model.state_dict()), 0)
    stale = 0
    total = opts.finetune_epochs * len(train)
    model.eval()
    for epoch in range(opts.finetune_epochs):
        order = rng.permutation(train)
        losses, correct = [], 0
        for start in range(0, len(order), opts.batch_size):
            idx = order[start : start + opts.batch_size]
            x = torch.from_numpy(
                np.stack([np.asarray(aug(images[i]), dtype=np.uint8) for i in idx])
            )
            target = torch.from_numpy(y[idx])
            _, logits = model(x)
            loss = F.cross_entropy(logits, target, weight=cw)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            ema.update_parameters(model)
            losses.append(loss.item() * len(idx))
            correct += int((logits.argmax(1) == target).sum())
            progress("fine-tuning", epoch * len(train) + start + len(idx), total)
        hist["train_loss"].append(sum(losses) / len(train))
        hist["train_acc"].append(correct / len(train))
        averaged = ema.module.eval()
        if val_x is None:
            best = (0.0, copy.deepcopy(averaged.state_dict()), epoch + 1)
            continue
        with torch.no_grad():
            logits = torch.cat([averaged(val_x[i : i + 64])[1] for i in range(0, len(val_x), 64)])
        vt = torch.from_numpy(y[val])
        val_acc = float((logits.argmax(1) == vt).float().mean())
        hist["val_loss"].append(float(F.cross_entropy(logits, vt)))
        hist["val_acc"].append(val_acc)
        log.info("fine-tune epoch %d: val acc %.4f", epoch + 1, val_acc)
        if val_acc > best[0]:
            best, stale = (val_acc, copy.deepcopy(averaged.state_dict()), epoch + 1), 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    model.load_state_dict(best[1])
    model = model.to(memory_format=torch.contiguous_format).eval()
    info = {
        "epochs_run": len(hist["train_loss"]),
        "best_epoch": best[2],
        "best_val_acc": best[0],
        "lr": opts.finetune_lr,
        "weights": f"exponential moving average, decay {EMA_DECAY}",
    }
    return model, info, hist


#: Most label suspects a version keeps (the likeliest first).
MAX_SUSPECTS = 500


def check_labels(
    feats: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    paths: list[Path],
    phase1: dict[str, Any],
    opts: TrainOptions,
) -> dict[str, Any]:
    """Training images whose label looks wrong, by confident learning on out-of-fold probabilities.

    Every image is predicted by a phase-1 head refitted without its fold (cached features:
    seconds); ``classifier._label_errors`` ranks them. ``meta.json`` "label_check".
    """
    from imagesieve.classifier._label_errors import find_label_errors, out_of_fold_probs

    t = time.perf_counter()
    rows = np.arange(len(y))
    probs = out_of_fold_probs(
        feats, y, rows, len(classes), phase1["weight_decay"], opts.class_weight, seed=opts.seed
    )
    suspects = find_label_errors(probs, y, classes)
    return {
        "method": "confident learning (prune by class, ranked by self-confidence) on "
        "out-of-fold probabilities of the phase-1 head, 5 folds",
        "checked": int(len(y)),
        "found": len(suspects),
        "suspects": [
            {"path": str(paths[s.index]), **{k: v for k, v in s.to_dict().items() if k != "index"}}
            for s in suspects[:MAX_SUSPECTS]
        ],
        "seconds": round(time.perf_counter() - t, 2),
    }


#: Held-out distances kept as the drift reference (quantiles past this many).
DRIFT_SAMPLE = 2000


def drift_sample(held: HeldOut, calibration: dict[str, Any]) -> dict[str, Any]:
    """``meta.json`` "drift": held-out distances (quantiles past DRIFT_SAMPLE) and UNKNOWN rate."""
    d = np.sort(held.distance[~np.isnan(held.distance)])
    if len(d) > DRIFT_SAMPLE:
        d = np.quantile(d, (np.arange(DRIFT_SAMPLE) + 0.5) / DRIFT_SAMPLE)
    return {
        "distance": [round(float(v), 6) for v in d],
        "unknown_rate": calibration["realised"]["unknown"],
        "on": held.on,
    }


def _merge_history(h1: dict, h2: dict | None) -> dict[str, list[float]]:
    """Phase-1 then phase-2 curves, with the epoch where phase 2 starts marked."""
    if not h2:
        return h1
    out = {k: h1.get(k, []) + h2.get(k, []) for k in CURVES}
    out["phase_boundary"] = [len(h1.get("train_loss", []))]
    return out


def _copies_again(
    onnx: Path, config: Any, samples: list, opts: TrainOptions
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The near-duplicate check's copies of training images, through a fine-tuned model.

    The same copies (the same seed), whose tapped features fine-tuning moved as it moved the
    images': (the image each was made from, their features); (None, None) with under 10 images.
    """
    if len(samples) < 10:
        return None, None
    items, source = training_copies([s.path for s in samples], config, opts.seed)
    arrays, errors = extract_features(
        onnx, config, items, (OOD_FEATURES,), batch_size=opts.batch_size
    )
    ok = np.array([e is None for e in errors], bool)
    return source[ok], arrays[OOD_FEATURES][ok]


def train_model(
    data_dir: str | os.PathLike,
    ws: Workspace,
    opts: TrainOptions | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a new model version on an ImageFolder, evaluate it, and (by default) activate it."""
    import torch

    from imagesieve.classifier._evaluate import evaluate_version_on
    from imagesieve.models import (
        ModelVersion,
        create_backbone,
        discard_build_dir,
        new_build_dir,
        write_version,
    )
    from imagesieve.models.export import make_model, save_model_files

    opts = opts or TrainOptions()
    progress = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    folder: ImageFolder = scan_image_folder(data_dir)
    skipped = [{"path": str(s.path), "reason": s.reason} for s in folder.skipped]

    # Phase 1 features: the frozen backbone over every image, once, with the ONNX engine.
    onnx = backbone_onnx(ws, opts.backbone, opts.weights)
    paths = [s.path for s in folder.samples]
    config = get_backbone_spec(opts.backbone).config
    qualities: list = []
    signatures: list = []
    arrays, errors = extract_features(
        onnx,
        config,
        paths,
        ("features", "embedding", OOD_FEATURES),
        batch_size=opts.batch_size,
        progress=progress,
        qualities=qualities,
        signatures=signatures,
    )
    feats, embeddings = arrays["features"], arrays["embedding"]
    ood = arrays.get(OOD_FEATURES)  # None: the backbone has no ood_taps
    keep = np.array([e is None for e in errors], bool)
    skipped += [
        {"path": str(p), "reason": e.reason}
        for p, e in zip(paths, errors, strict=True)
        if e is not None
    ]
    samples = [s for s, k in zip(folder.samples, keep, strict=True) if k]
    feats, embeddings = feats[keep], embeddings[keep]
    ood = None if ood is None else ood[keep]
    classes = sorted({s.label for s in samples})
    if len(classes) < 2:
        raise UserError(
            f"need at least 2 classes with readable images in {data_dir}, found {len(classes)}: {classes}"
        )
    y = np.array([classes.index(s.label) for s in samples], np.int64)
    kept_signatures = np.stack([s for s, k in zip(signatures, keep, strict=True) if k])
    progress("finding near-duplicates", 0, 1)
    dups = find_training_duplicates(
        onnx,
        config,
        [s.path for s in samples],
        embeddings,
        kept_signatures,
        opts.seed,
        opts.batch_size,
    )
    progress("finding near-duplicates", 1, 1)
    copy_of, copy_ood = dups.copy_of, dups.copy_ood  # the far rule's fit takes them too

    if folder.presplit:
        by = {
            k: np.array([i for i, s in enumerate(samples) if s.split == k], np.int64)
            for k in ("train", "val", "test")
        }
        plan = SplitPlan(
            by["train"],
            by["val"],
            by["test"],
            {
                c: {k: int((y[by[k]] == ci).sum()) for k in by} | {"rule": "pre-split folders"}
                for ci, c in enumerate(classes)
            },
        )
    else:
        plan = adaptive_split(
            y,
            classes,
            test_size=opts.test_size,
            val_size=opts.val_size,
            seed=opts.seed,
            groups=dups.groups,
        )

    progress("training head", 0, 1)
    head, phase1, history = _fit_head(feats, y, plan.train, plan.val, len(classes), opts)
    head1 = copy.deepcopy(head)  # phase 2 trains ``head`` in place; refits start from this one
    progress("training head", 1, 1)
    progress("checking labels", 0, 1)
    label_check = check_labels(feats, y, classes, [s.path for s in samples], phase1, opts)
    progress("checking labels", 1, 1)
    backbone = create_backbone(opts.backbone, weights=opts.weights)
    model = make_model(backbone, head, pooling=HEAD_POOLING)
    phase2 = None
    if opts.finetune_epochs > 0:
        images = [None] * len(samples)
        need = np.concatenate([plan.train, plan.val])
        for i in need:
            images[i] = load_image(samples[i].path, min_side=config.resize_side).image
        val = plan.val
        train_idx = plan.train
        if len(val) == 0:
            train_idx, val = _holdout(y, plan.train, 0.15, opts.seed)
        model, phase2, hist2 = _finetune(
            model, images, y, train_idx, val, len(classes), opts, progress
        )
        history = _merge_history(history, hist2)

    build = new_build_dir(ws)
    try:
        save_model_files(model, classes, build)
        if (
            opts.finetune_epochs > 0
        ):  # fine-tuning moved the embedding: recompute with the final model
            need = np.concatenate([plan.train, plan.val])
            embeddings = np.zeros_like(embeddings)
            arrays, _ = extract_features(
                build / "model.onnx",
                config,
                [samples[i].path for i in need],
                ("embedding", "logits", OOD_FEATURES),
                batch_size=opts.batch_size,
                progress=progress,
            )
            embeddings[need] = arrays["embedding"]
            if ood is not None:
                ood = np.zeros_like(ood)
                ood[need] = arrays[OOD_FEATURES]
                copy_of, copy_ood = _copies_again(build / "model.onnx", config, samples, opts)
            val_logits = arrays["logits"][len(plan.train) :]
        else:
            with torch.no_grad():
                val_logits = head(torch.from_numpy(feats[plan.val])).numpy()
        reference = ReferenceSet(
            embeddings[plan.train],
            [str(samples[i].path) for i in plan.train],
            [samples[i].label for i in plan.train],
            kept_signatures[plan.train],
        )
        reference.save(build)
        # The far-from-training distance on the tapped features, where the backbone has them,
        # fitted with the near-duplicate check's copies of training images too.
        far = None
        if ood is not None:
            features = FarFeatures(ood, copy_ood, copy_of)
            far = (features, features.fit(y, plan.train))
            far[1].save(build)
        # The whole UNKNOWN decision calibrated on held-out known images, and the report card.
        progress("calibrating UNKNOWN", 0, 1)
        refit = _refit_top1(feats, y, plan.train, head1, opts, phase1["weight_decay"])
        val_top1 = softmax(val_logits).max(1) if len(plan.val) else np.zeros(0)
        # Photo quality thresholds from the training images themselves; a poor photo is
        # UNKNOWN, so the decision is calibrated with it.
        measured = [q for q, k in zip(qualities, keep, strict=True) if k]
        quality = calibrate_quality([q for q in measured if q is not None])
        effective = quality.with_overrides(opts.quality)
        columns = quality_columns(measured)
        poor = effective.poor(columns)
        held = held_out(
            embeddings, y, plan.train, plan.val, val_top1, refit, opts.seed, poor, far, columns
        )
        new = new_types(embeddings, y, plan.train, plan.val, refit, poor, far, columns)
        # kept, so another target or other thresholds need no retraining (``calibrate_at``)
        save_calibration(build, held, new)
        rule, calibration, card = report_card(
            embeddings,
            y,
            classes,
            plan.train,
            plan.val,
            held,
            refit,
            opts.confidence_threshold,
            opts.false_unknown_rate,
            poor,
            far,
            new,
        )
        progress("calibrating UNKNOWN", 1, 1)
        meta: dict[str, Any] = {
            "kind": "trained",
            "backbone": opts.backbone,
            "weights": opts.weights or get_backbone_spec(opts.backbone).weights_source,
            "classes": classes,
            "preprocessing": config.to_dict(),
            "thresholds": {
                "confidence": rule.confidence,
                "distance": rule.distance,
                "mix": rule.mix,
                "calibration": calibration,
                "far": FAR_COSINE if far is None else FAR_MAHALANOBIS,
                # generated copies of training images the distance's fit also took
                "far_copies": None if far is None else far[0].copies_of(plan.train),
            },
            "open_set": card,
            "label_check": label_check,
            "duplicates": dups.report(plan, [s.path for s in samples], folder.presplit),
            # The held-out known images' distances to the training data (at most
            # DRIFT_SAMPLE, as quantiles): what scored batches are tested against for drift.
            "drift": drift_sample(held, calibration),
            "quality": quality.to_dict(),
            "quality_overrides": dict(opts.quality),
            "data": {
                "root": str(Path(data_dir).resolve()),
                "fingerprint": folder.fingerprint(),
                "images": len(samples),
                "counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
                "presplit": folder.presplit,
                "skipped": skipped,
            },
            "split": plan.to_dict(),
            "training": {"options": asdict(opts), "phase1": phase1, "phase2": phase2},
        }
        eval_idx, eval_on = (
            (plan.test, "test")
            if len(plan.test)
            else (plan.val, "val")
            if len(plan.val)
            else (plan.train, "train")
        )
        draft = ModelVersion(build, meta)
        metrics = evaluate_version_on(
            draft,
            [samples[i].path for i in eval_idx],
            [samples[i].label for i in eval_idx],
            build / "report",
            history=history,
            extra={"evaluated_on": eval_on, "split": plan.to_dict(), "open_set": card},
            batch_size=opts.batch_size,
            # images the calibration did not see: whether their rate is off target means something
            target=opts.false_unknown_rate if eval_on == "test" else None,
        )
        meta["metrics"] = {
            k: metrics[k]
            for k in (
                "n",
                "accuracy",
                "macro_f1",
                "roc_auc",
                "ece",
                "unknown_rate",
                "unknown_by_rule",
                "unknown_vs_target",
            )
            if k in metrics
        }
        meta["metrics"]["evaluated_on"] = eval_on
        meta["training"]["seconds"] = round(time.perf_counter() - t0, 1)
        version = write_version(ws, build, meta)
    except BaseException:
        discard_build_dir(build)
        raise
    if opts.activate:
        activate_version(ws, version.name)
    return TrainResult(version, meta["metrics"], skipped, time.perf_counter() - t0)
