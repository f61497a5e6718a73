"""The Model tab: versions, metrics, report images and the UNKNOWN thresholds."""

from __future__ import annotations

import csv
import re
from typing import Any

import gradio as gr

from imagesieve._errors import SieveError
from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import (
    THUMB,
    Panel,
    app_user,
    pct,
    table_frame,
    user_errors,
    version_or_none,
)
from imagesieve.classifier import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    QualityRule,
    UnknownRule,
    bound_text,
    card_at,
    card_words,
    held_out_unknowns,
    held_out_words,
    off_target_words,
    parse_bounds,
    target_rate,
    untested_words,
)
from imagesieve.ingest import describe_history, read_history


def _rule_shares(by_rule: dict[str, float]) -> str:
    """The share of images each UNKNOWN rule fires on, in words."""
    return (
        f"poor photo {pct(by_rule.get(POOR_QUALITY, 0))}, "
        f"low confidence {pct(by_rule.get(LOW_CONFIDENCE, 0))}, far from training "
        f"{pct(by_rule.get(FAR_FROM_TRAINING, 0))}"
    )


def _tradeoff_md(service: Service) -> str:
    """The active version's ``threshold_tradeoff`` as a table ("" when it kept no records)."""
    try:
        doc = service.threshold_tradeoff()
    except SieveError:  # trained before the records were kept
        return ""
    lines = [
        "**What each false-UNKNOWN rate costs and catches** (thresholds as training would "
        "calibrate them; *test*: its held-out images of known classes flagged; *new type*: "
        "the report card's mean, a never-seen type flagged):",
        "",
        "| rate | confidence below | distance beyond | test flagged | new type flagged | worst |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rates"]:
        w = r["worst_new_type"]
        lines.append(
            f"| {r['target']:.0%} | {r['confidence']:.3f} | "
            + ("off" if r["distance"] is None else f"{r['distance']:.3f}")
            + " | "
            + ("" if r["test_unknown_rate"] is None else f"{r['test_unknown_rate']:.1%}")
            + f" | {pct(r['new_type_recall'])} | "
            + ("" if w is None else f"{w['class']} {pct(w['recall'])}")
            + " |"
        )
    return "\n".join(lines)


def _metrics_md(version: Any) -> str:
    m = version.meta.get("metrics", {})
    names = [
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("weighted_f1", "weighted-F1"),
        ("roc_auc", "ROC-AUC"),
        ("ece", "calibration error (ECE)"),
        ("unknown_rate", "UNKNOWN rate"),
    ]
    head = " · ".join(
        f"{label} **{m[key]:.3f}**" for key, label in names if isinstance(m.get(key), int | float)
    )
    lines = [
        f"**{version.name}** ({version.meta.get('backbone')}), evaluated on "
        f"{m.get('n', '?')} {m.get('evaluated_on', '')} images: {head}",
        "",
    ]
    untested = untested_words(version.meta.get("split") or {})
    if untested:
        lines += [f"{untested[0].upper()}{untested[1:]}.", ""]
    by_rule = m.get("unknown_by_rule") or {}
    if by_rule:
        lines += [
            f"UNKNOWN on these known-class images: **{pct(m['unknown_rate'])}** "
            f"({_rule_shares(by_rule)})",
            "",
        ]
    off = off_target_words(m.get("unknown_vs_target"))
    now = held_out_unknowns(version) if version.thresholds_tuned else None
    if now:  # the figures above are the calibrated thresholds'; these the operator's
        off = off_target_words(now["vs_target"])
        lines += [
            f"The thresholds an operator set mark {held_out_words(now)}: "
            f"{_rule_shares(now['by_rule'])}",
            "",
        ]
    if off:
        lines += [f"**Off target**: {off}.", ""]
    card = version.meta.get("open_set") or {}
    tuned = card_at(version, UnknownRule.of_version(version)) if now else None
    if tuned:  # the card at the operator's thresholds, beside training's
        card = card | tuned
    if card.get("per_class"):
        worst = card["worst"]
        at = " at the thresholds an operator set" if tuned else ""
        lines += [
            f"**Open-set report card**{at}: a type the model has never seen would be flagged "
            f"UNKNOWN **{pct(card['mean_recall'])}** of the time on average (each class left "
            f"out in turn; worst: {worst['class']} {pct(worst['recall'])}).",
            "",
            "| left out | flagged UNKNOWN |",
            "|---|---|",
            *(f"| {c} | {pct(r)} |" for c, r in card["per_class"].items()),
            "",
        ]
    history = read_history(version)
    if history is not None:
        first, *rest = describe_history(history)
        lines += [f"**What it says about the stored images** ({first})", ""]
        lines += [*(f"* {line}" for line in rest), ""]
    per_class = m.get("per_class") or {}
    if per_class:
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, row in per_class.items():
            cells = [row.get(k) for k in ("precision", "recall", "f1")]
            text = " | ".join("" if v is None else f"{v:.3f}" for v in cells)
            lines.append(f"| {name} | {text} | {row.get('support', '')} |")
    return "\n".join(lines)


#: Images shown for a clicked confusion cell.
CELL_IMAGES = 48


def _confusion_frame(doc: dict[str, Any]) -> Any:
    """The confusion counts as a table: one row per true class, one column per prediction."""
    classes = doc["classes"]
    return table_frame(
        ["true \\ predicted", *classes],
        ([c, *row] for c, row in zip(classes, doc["counts"], strict=True)),
    )


def _misclassified(version: Any, limit: int = 48) -> list[tuple[Any, str]]:
    """The misclassified evaluation images (from the audit CSV), or the report's montage."""
    from PIL import Image

    from imagesieve.data import load_image

    out: list[tuple[Any, str]] = []
    audit = version.report_dir / "audit.csv"
    if audit.is_file():
        with open(audit, newline="", encoding="utf-8") as f:
            wrong = [r for r in csv.DictReader(f) if r.get("correct") == "false"]
        wrong.sort(key=lambda r: -float(r.get("top1_prob") or 0))
        for r in wrong[:limit]:
            try:
                im = load_image(r["path"]).image
            except (ValueError, OSError):  # training images moved away: the montage stands in
                continue
            im.thumbnail((THUMB, THUMB))
            p = float(r.get("top1_prob") or 0)
            out.append((im, f"{r['true']} → {r['top1']} {pct(p)}"))
    montage = version.report_dir / "misclassified.png"
    if not out and montage.is_file():
        out.append((Image.open(montage).convert("RGB"), "most confident mistakes (report)"))
    return out


def _report_image(version: Any, name: str) -> Any:
    from PIL import Image

    path = version.report_dir / name
    if not path.is_file():
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def _score_words(version: Any) -> str:
    """The far-from-training score in words: the distance, plus the mix of low confidence."""
    words, mix = version.distance_words, version.mix
    return f"{words} + {mix:.2f} x (1 - Top-1)" if mix else words


def _threshold_controls(version: Any) -> tuple[float, bool, float, float]:
    """A version's threshold controls (None: defaults): confidence, distance rule on, distance.

    Then the distance slider's maximum: the distance's (2) plus ``mix``'s share.
    """
    if version is None:
        return 0.5, True, 0.3, 2.0
    distance = version.distance_threshold
    return (
        version.confidence_threshold,
        distance is not None,
        distance if distance is not None else 0.3,
        2.0 + version.mix,
    )


def _bounds_text(version: Any) -> str:
    """A version's photo quality bounds as the text the Model tab edits ('' without a rule)."""
    rule = None if version is None else QualityRule.of_version(version.meta)
    if rule is None:
        return ""
    return ", ".join(f"{k}={bound_text(v)}" for k, v in rule.to_dict().items())


def _bounds_asked(version: Any, text: str) -> dict[str, Any] | None:
    """The bounds ``text`` changes from the version's, as shown (None: none); gr.Error if bad."""
    if version is None or not (text or "").strip():
        return None
    try:
        asked = parse_bounds([t for t in re.split(r"[,\s]+", text.strip()) if t])
    except ValueError as e:
        raise gr.Error(str(e), print_exception=False) from None
    rule = QualityRule.of_version(version.meta)
    current = {} if rule is None else rule.to_dict()
    changed = {
        k: v
        for k, v in asked.items()
        if v == "auto" or k not in current or bound_text(v) != bound_text(current[k])
    }
    return changed or None


def model_tab(service: Service) -> Panel:
    def asked(
        confidence: float, use_distance: bool, distance: float, target: float | None
    ) -> tuple[float, float | None]:
        """The thresholds the controls ask for (distance None: off).

        With ``target``, the calibrated rate's exact values: the sliders show them rounded.
        """
        if target:
            found = service.thresholds_for_target(target)
            return found["confidence"], found["distance"]
        return float(confidence), float(distance) if use_distance else None

    def preview(
        confidence: float,
        use_distance: bool,
        distance: float,
        bounds: str,
        target: float | None = None,
    ) -> str:
        if version_or_none(service) is None:
            return ""
        confidence, distance = asked(confidence, use_distance, distance, target)
        counts = service.threshold_preview(
            confidence, distance, _bounds_asked(service.version, bounds), target
        )
        rule = f"Top-1 below {pct(confidence)}"
        if distance is not None:
            rule += f" or {_score_words(service.version)} beyond {distance:.3f}"
        stored = counts["stored"]
        held = counts["held_out"]
        return (
            f"With **{rule}**, **{counts['unknown']:,} of {stored:,}** stored images would be "
            f"UNKNOWN (poor photo: {counts[POOR_QUALITY]:,}; low confidence: "
            f"{counts[LOW_CONFIDENCE]:,}; far from the training data: "
            f"{counts[FAR_FROM_TRAINING]:,}). Marked UNKNOWN now: "
            f"{counts['unknown_now']:,}. "
            + (f"False alarms: they would mark {held_out_words(held)}. " if held else "")
            + (f"New types: {card_words(card)}. " if (card := counts["report_card"]) else "")
            + "**Apply** makes these the model's thresholds and re-decides the stored images."
        )

    def refresh() -> tuple:
        versions = service.versions()
        columns = ["version", "active", "kind", "backbone", "classes", "accuracy", "macro_f1"]
        columns += ["unknown_rate"]  # its test images', at the thresholds it has now
        table = table_frame(
            [*columns, "created_at"],
            ([v.get(c) for c in [*columns, "created_at"]] for v in versions),
        )
        names = [v["version"] for v in versions if v.get("kind") == "trained"]
        version = version_or_none(service)
        if version is None:
            return (
                table,
                gr.Dropdown(choices=names, value=names[-1] if names else None),
                "No trained model yet: run `imagesieve train DATA_DIR` or `imagesieve demo`.",
                None,
                None,
                [],
                gr.Slider(),
                gr.Checkbox(),
                gr.Slider(),
                "",
                "",
                None,
                None,
                "",
                None,
            )
        confidence, use_distance, distance, maximum = _threshold_controls(version)
        aimed = target_rate(version)
        return (
            table,
            gr.Dropdown(choices=names, value=version.name),
            _metrics_md(version),
            _report_image(version, "confusion_matrix.png"),
            _report_image(version, "training_curves.png"),
            _misclassified(version),
            gr.Slider(value=confidence),
            gr.Checkbox(value=use_distance),
            gr.Slider(
                value=distance,
                maximum=maximum,
                label=f"{_score_words(version).capitalize()} further than",
            ),
            _bounds_text(version),
            preview(confidence, use_distance, distance, ""),
            _confusion_frame(service.confusion()),
            None,
            _tradeoff_md(service),
            None if aimed is None else round(100 * aimed, 4),  # Calibrate starts from it
        )

    @user_errors
    def cell_images(evt: gr.SelectData) -> tuple:
        """A click on a confusion cell: that cell's evaluation images, most confident first."""
        row, col = evt.index if isinstance(evt.index, list | tuple) else (None, None)
        doc = service.confusion()
        classes = doc["classes"]
        if row is None or col is None or not 0 < col <= len(classes) or row >= len(classes):
            return gr.skip(), gr.skip()
        true, predicted = classes[row], classes[col - 1]
        doc = service.confusion(None, true, predicted)
        shown = doc["images"][:CELL_IMAGES]
        items = []
        for im in shown:
            path = service.file_thumbnail(im["path"])
            if path is not None:
                items.append((path, f"{true} → {predicted} {pct(im['top1_prob'])}"))
        words = (
            f"**{len(doc['images'])}** evaluation images of **{true}** predicted **{predicted}**"
            + (
                f" (the {len(shown)} most confident shown)"
                if len(doc["images"]) > len(shown)
                else ""
            )
            + (f"; {len(shown) - len(items)} no longer on disk" if len(items) < len(shown) else "")
        )
        return items, words

    @user_errors
    def activate(name: str | None, request: gr.Request) -> None:
        if not name:
            raise gr.Error("pick a version", print_exception=False)
        version = service.activate(name, who=app_user(request))
        gr.Info(f"now serving {version.name}")

    gr.Markdown("Model versions in this workspace; the active one scores every image.")
    versions = gr.Dataframe(interactive=False, label="Versions", elem_id="model-versions")
    with gr.Row():
        pick = gr.Dropdown(label="Version", choices=[], elem_id="model-pick", scale=3)
        activate_button = gr.Button("Activate", elem_id="model-activate", scale=1)
    metrics = gr.Markdown(elem_id="model-metrics")
    with gr.Row():
        confusion = gr.Image(
            label="Confusion matrix", interactive=False, format="png", elem_id="model-confusion"
        )
        curves = gr.Image(
            label="Training curves", interactive=False, format="png", elem_id="model-curves"
        )
    confusion_table = gr.Dataframe(
        interactive=False,
        label="Confusion by class (rows: true, columns: predicted): click a cell to see its images",
        elem_id="model-confusion-table",
    )
    cell_words = gr.Markdown(elem_id="model-cell-words")
    cell_gallery = gr.Gallery(
        label="The cell's images (true → predicted, Top-1 probability)",
        columns=8,
        height=260,
        object_fit="contain",
        elem_id="model-cell-gallery",
    )
    confusion_table.select(cell_images, None, [cell_gallery, cell_words])
    misclassified = gr.Gallery(
        label="Misclassified evaluation images (true → predicted)",
        columns=8,
        height=260,
        object_fit="contain",
        elem_id="model-misclassified",
    )
    gr.Markdown("### UNKNOWN thresholds")
    # Start at the active version's thresholds: a preview asked for before the page's first
    # refresh lands (a busy server) then speaks of the thresholds the sliders will show.
    start_confidence, start_use, start_distance, start_maximum = _threshold_controls(
        version_or_none(service)
    )
    with gr.Row():
        confidence = gr.Slider(
            0,
            1,
            value=start_confidence,
            step=0.01,
            label="Top-1 confidence below",
            elem_id="model-confidence",
        )
        use_distance = gr.Checkbox(
            value=start_use, label="Use the distance rule", elem_id="model-use-distance"
        )
        distance = gr.Slider(
            0,
            start_maximum,
            value=start_distance,
            step=0.005,
            label="Nearest training image further than (cosine distance)",
            elem_id="model-distance",
        )
    bounds = gr.Textbox(
        value=_bounds_text(version_or_none(service)),
        label="Photo quality bounds (a poor photo is UNKNOWN): change a value, 'off' switches a "
        "check off, 'auto' puts the calibrated one back; Enter previews",
        elem_id="model-quality-bounds",
    )
    tradeoff = gr.Markdown(elem_id="model-tradeoff")
    with gr.Row():
        rate = gr.Number(
            value=None,
            minimum=0.1,
            maximum=50,
            label="Or set them for a false-UNKNOWN rate (%): the share of known-class images "
            "to flag, as training calibrates",
            elem_id="model-target",
            scale=3,
        )
        calibrate_button = gr.Button("Calibrate", elem_id="model-calibrate", scale=1)
    # The rate the sliders were calibrated for (a share; None once a person moves them).
    aimed = gr.State(None)
    counts = gr.Markdown(elem_id="model-threshold-preview")
    apply_button = gr.Button("Apply these thresholds", elem_id="model-apply-thresholds")
    outputs = [versions, pick, metrics, confusion, curves, misclassified]
    outputs += [confidence, use_distance, distance, bounds, counts, confusion_table, aimed]
    outputs += [tradeoff, rate]
    activated = activate_button.click(activate, pick, None)

    @user_errors
    def calibrate(percent: float | None, use_distance: bool, distance: float) -> tuple:
        if percent is None:
            raise gr.Error("give a false-UNKNOWN rate in percent, e.g. 3", print_exception=False)
        found = service.thresholds_for_target(float(percent) / 100)
        on = found["distance"] is not None
        return (
            found["confidence"],
            on,
            found["distance"] if on else distance,
            found["target"],
        )

    @user_errors
    def apply(
        confidence: float,
        use_distance: bool,
        distance: float,
        text: str,
        target: float | None,
        request: gr.Request,
    ) -> str:
        counts = service.set_thresholds(
            *asked(confidence, use_distance, distance, target),
            who=app_user(request),
            quality=_bounds_asked(service.version, text),
            target=target,
        )
        gr.Info(
            f"thresholds applied: {counts['unknown']:,} of {counts['stored']:,} stored images UNKNOWN"
        )
        return _bounds_text(service.version)

    applied = apply_button.click(apply, [confidence, use_distance, distance, bounds, aimed], bounds)
    # One queue for everything that writes the preview, so results land in the order asked.
    thresholds = {"concurrency_id": "model-thresholds", "concurrency_limit": 1}
    sliders = [confidence, use_distance, distance, bounds]

    def by_hand(confidence: float, use_distance: bool, distance: float, bounds: str) -> tuple:
        """A person moved a control: these are no longer a calibrated rate's thresholds."""
        return user_errors(preview)(confidence, use_distance, distance, bounds), None

    bounds.submit(
        user_errors(preview), [*sliders, aimed], counts, show_progress="hidden", **thresholds
    )
    for control in sliders[:3]:
        control.input(
            by_hand,
            sliders,
            [counts, aimed],
            trigger_mode="always_last",
            show_progress="hidden",
            **thresholds,
        )
    calibrate_button.click(
        calibrate, [rate, use_distance, distance], [confidence, use_distance, distance, aimed]
    ).success(user_errors(preview), [*sliders, aimed], counts, show_progress="hidden", **thresholds)

    def on_open(tab: Any) -> None:  # the counts change as images are scored; the sliders stay
        tab.select(
            user_errors(preview), [*sliders, aimed], counts, show_progress="hidden", **thresholds
        )

    return Panel(user_errors(refresh), outputs, on_open=on_open, model_changes=[activated, applied])
