"""The Predict tab: one image (upload or camera), its verdict, Top-3, Grad-CAM and neighbours."""

from __future__ import annotations

import datetime as dt
import html
import io
from pathlib import Path
from typing import Any

import gradio as gr

from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import (
    Panel,
    class_names,
    distance_caption,
    gallery_value,
    one_line,
    pct,
    user_errors,
)
from imagesieve.classifier import FAR_FROM_TRAINING, LOW_CONFIDENCE, UNKNOWN, Prediction

#: The Grad-CAM class choice meaning "the Top-1 class of the image".
TOP1_CHOICE = "Top-1 class"

#: The badge's colours, light and dark (the app's dark mode sets ``.dark`` on the page): each
#: at least 4.5:1 (WCAG AA) against the page's background in its mode.
VERDICT_CSS = """<style>
.imagesieve-verdict { --verdict: #15803d; }
.imagesieve-verdict.unknown { --verdict: #b91c1c; }
.imagesieve-verdict.empty { --verdict: #4b5563; }
.dark .imagesieve-verdict { --verdict: #4ade80; }
.dark .imagesieve-verdict.unknown { --verdict: #f87171; }
.dark .imagesieve-verdict.empty { --verdict: #9ca3af; }
.imagesieve-verdict { border: 3px solid var(--verdict); border-radius: 10px; padding: 10px 14px;
  background: color-mix(in srgb, var(--verdict) 8%, transparent); }
.imagesieve-verdict.empty { border: 2px dashed var(--verdict); background: none;
  color: var(--verdict); }
.imagesieve-verdict .verdict-label { font-size: 1.8em; font-weight: 800; letter-spacing: .03em;
  color: var(--verdict); }
.imagesieve-verdict .verdict-detail { margin-top: 2px; }
</style>"""


def _badge(text: str, detail: str, kind: str, **data: str) -> str:
    attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in data.items())
    return (
        f'<div class="imagesieve-verdict {kind}"{attrs}>'
        f'<div class="verdict-label">{html.escape(text)}</div>'
        f'<div class="verdict-detail">{html.escape(detail)}</div></div>'
    )


def verdict_html(pred: Prediction, threshold: float | None, distance: float | None) -> str:
    """The label as a badge: green for a class, an unmistakable red UNKNOWN with its reasons."""
    if pred.label != UNKNOWN:
        return _badge(
            pred.label or "",
            f"Top-1 confidence {pct(pred.confidence)}",
            "known",
            label=pred.label or "",
        )
    details = []
    for reason in (pred.reason or "").split("+"):
        if reason == LOW_CONFIDENCE:
            limit = f", below {pct(threshold)}" if threshold is not None else ""
            details.append(f"low confidence (Top-1 {pct(pred.confidence)}{limit})")
        elif reason == FAR_FROM_TRAINING:
            bits = []
            if pred.neighbor_distance is not None:
                bits.append(f"distance {pred.neighbor_distance:.3f}")
            if distance is not None:
                bits.append(f"limit {distance:.3f}")
            details.append("far from the training data" + (f" ({', '.join(bits)})" if bits else ""))
        elif reason:
            details.append(reason.replace("_", " "))
    return _badge(
        UNKNOWN,
        "; ".join(details) or "not like any known class",
        "unknown",
        label=UNKNOWN,
        reason=pred.reason or "",
    )


def _empty_badge(text: str = "Upload an image to score it") -> str:
    return f'<div class="imagesieve-verdict empty">{html.escape(text)}</div>'


def _top3(pred: Prediction) -> dict[str, float]:
    return {c: float(p) for c, p in pred.top3}


def _jpeg(image: Any) -> bytes:
    """A camera frame (PIL or array) as JPEG bytes, the form it is scored and stored in."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def predict_tab(service: Service) -> Panel:
    def thresholds() -> tuple[float | None, float | None]:
        predictor = service.predictor
        if predictor is None:
            return None, None
        return predictor.threshold, predictor.distance_threshold

    def show(result: Any) -> tuple[str, dict[str, float], str, list]:
        pred = result.prediction
        parts = []
        if pred.id is not None:
            parts.append(f"stored as **#{pred.id}**")
        if pred.skipped:
            parts.append("this content was stored before")
        parts.append(f"model {result.model_version}")
        if pred.neighbor_distance is not None:
            parts.append(f"distance to the training data {pred.neighbor_distance:.3f}")
        if pred.cluster_id is not None and pred.cluster_id >= 0:
            parts.append(f"in UNKNOWN cluster {pred.cluster_id}")
        parts.append(f"{pred.width}×{pred.height} px, {result.seconds:.2f} s")
        gallery = gallery_value(
            service, ((n["id"], distance_caption(n)) for n in result.neighbours)
        )
        return verdict_html(pred, *thresholds()), _top3(pred), " · ".join(parts), gallery

    @user_errors
    def score_upload(path: str | None) -> tuple:
        if not path:
            return _empty_badge(), None, "", [], None, None
        result = service.predict(Path(path).read_bytes(), Path(path).name)
        return (*show(result), path, None)

    @user_errors
    def live_frame(frame: Any) -> tuple:
        if frame is None:
            return gr.skip(), gr.skip(), None
        data = _jpeg(frame)
        result = service.predict(data, "webcam.jpg", neighbours=0, store=False)
        return _top3(result.prediction), verdict_html(result.prediction, *thresholds()), data

    @user_errors
    def store_frame(data: bytes | None) -> tuple:
        if not data:
            raise gr.Error("no camera frame yet: start the camera first", print_exception=False)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        return (*show(service.predict(data, f"webcam-{stamp}.jpg")), data, None)

    @user_errors
    def explain(
        source: str | bytes | None,
        class_name: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands out its bar
    ) -> Any:
        if source is None:
            raise gr.Error("score an image first (upload one or click an example)")
        from imagesieve.classifier import grad_cam_loaded
        from imagesieve.data import load_image

        if not grad_cam_loaded(service.version):
            progress(0, desc="loading the model for Grad-CAM (the first time: about 15 s)")
        wanted = None if class_name in (None, "", TOP1_CHOICE) else class_name
        try:
            cam = service.gradcam(source, wanted)
        except (ImportError, ValueError) as e:  # no torch, no checkpoint: the score still stands
            gr.Warning(f"no Grad-CAM: {one_line(e)}")
            return None
        image = load_image(source).image
        image.thumbnail((512, 512))
        return gr.Image(
            value=cam.overlay(image),
            label=f"Grad-CAM: where the model saw “{cam.class_name}” ({pct(cam.probability)})",
        )

    @user_errors
    def score_example(found: list[str], evt: gr.SelectData) -> tuple:
        i = evt.index if isinstance(evt.index, int) else None
        if not found or i is None or i >= len(found):
            return (gr.skip(),) * (len(outputs) + 1)
        return (found[i], *score_upload(found[i]))

    def refresh(current: str | None) -> tuple:
        choices = [TOP1_CHOICE, *class_names(service)]
        found = service.example_images()
        return (
            gr.Dropdown(choices=choices, value=current if current in choices else TOP1_CHOICE),
            gr.Gallery(
                value=[(str(service.file_thumbnail(p)), name) for p, name in found],
                visible=bool(found),
            ),
            [p for p, _ in found],
        )

    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs():
                with gr.Tab("Upload"):
                    image = gr.Image(
                        label="Image",
                        type="filepath",
                        image_mode=None,  # the file as uploaded: scored and stored as sent
                        sources=["upload", "clipboard"],
                        elem_id="predict-image",
                    )
                    examples = gr.Gallery(
                        label="Examples from the training data: click one to score it",
                        columns=4,
                        height=180,
                        object_fit="contain",
                        allow_preview=False,
                        visible=False,
                        elem_id="predict-examples",
                    )
                with gr.Tab("Camera"):
                    camera = gr.Image(
                        label="Live camera (frames are scored, not stored)",
                        sources=["webcam"],
                        streaming=True,
                        type="pil",
                        elem_id="predict-camera",
                    )
                    live_verdict = gr.HTML(
                        _empty_badge("Start the camera to score it live"), elem_id="live-verdict"
                    )
                    live_top3 = gr.Label(label="Live Top-3", num_top_classes=3, show_heading=False)
                    store_button = gr.Button("Store this frame", elem_id="predict-store-frame")
        with gr.Column(scale=1):
            verdict = gr.HTML(_empty_badge(), head=VERDICT_CSS, elem_id="predict-verdict")
            top3 = gr.Label(
                label="Top-3", num_top_classes=3, show_heading=False, elem_id="predict-top3"
            )
            details = gr.Markdown(elem_id="predict-details")
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                cam_class = gr.Dropdown(
                    label="Explain class", choices=[TOP1_CHOICE], value=TOP1_CHOICE, scale=2
                )
                cam_button = gr.Button(
                    "Explain (Grad-CAM)", elem_id="predict-explain", scale=1, size="sm"
                )
            cam_image = gr.Image(
                label="Grad-CAM", interactive=False, format="png", elem_id="predict-gradcam"
            )
        with gr.Column(scale=2):
            neighbours = gr.Gallery(
                label="Most similar stored images",
                columns=5,
                height=320,
                object_fit="contain",
                elem_id="predict-neighbours",
            )
    source = gr.State(None)  # the scored image (upload path or frame bytes), for Grad-CAM
    frame = gr.State(None)  # the latest camera frame (JPEG bytes)
    example_paths = gr.State([])

    outputs = [verdict, top3, details, neighbours, source, cam_image]
    uploaded = image.upload(score_upload, image, outputs)
    # Grad-CAM on request: it costs a torch model in memory and a backward pass per image.
    cam_button.click(explain, [source, cam_class], cam_image)
    image.clear(score_upload, image, outputs)
    camera.stream(
        live_frame,
        camera,
        [live_top3, live_verdict, frame],
        stream_every=0.5,
        time_limit=600,
        concurrency_limit=4,
        show_progress="hidden",
    )
    kept = store_button.click(store_frame, frame, outputs)
    cam_class.input(
        lambda src, c: explain(src, c) if src is not None else None, [source, cam_class], cam_image
    )
    tried = examples.select(score_example, example_paths, [image, *outputs])
    return Panel(
        refresh,
        [cam_class, examples, example_paths],
        [cam_class],
        store_changes=[uploaded, kept, tried],
    )
