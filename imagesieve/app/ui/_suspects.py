"""The Review tab's list of suspected label errors in the training data, to move or remove.

The suspects come from the label check at training (``Service.label_suspects``); moving or
removing goes through ``Service.fix_training_labels``: the calls the REST API and the CLI make.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import app_user, pct, user_errors, version_or_none

#: Suspects shown at once (the likeliest first).
SHOWN = 60


def suspects_section(service: Service) -> list[Any]:
    """Build the section inside the current layout; returns the events that change data."""

    def show() -> tuple:
        if version_or_none(service) is None:
            return [], "No trained model yet.", gr.Dropdown(choices=[]), None, []
        doc = service.label_suspects()
        found = doc["suspects"][:SHOWN]
        items = []
        for s in found:
            path = service.file_thumbnail(s["path"])
            if path is not None:
                caption = f"{s['given']} → {s['suggested']} {pct(s['suggested_confidence'])}"
                items.append((str(path), caption))
        words = (
            f"**{len(doc['suspects'])}** of {doc['checked']:,} training images may be "
            f"mislabelled, likeliest first (found at training: {doc['method']}). Click one, "
            "then move it to a class or take it out of the training data; the audit log "
            "undoes either."
            if doc["suspects"]
            else "No suspected label errors in the training data."
        )
        return items, words, gr.Dropdown(choices=doc["classes"], value=None), None, found

    def pick(found: list[dict[str, Any]], evt: gr.SelectData) -> tuple:
        i = int(evt.index)
        if not 0 <= i < len(found):
            return None, gr.skip(), ""
        s = found[i]
        return (
            i,
            gr.Dropdown(value=s["suggested"]),
            f"`{s['path']}`: labelled **{s['given']}** ({pct(s['self_confidence'])}), looks "
            f"like **{s['suggested']}** ({pct(s['suggested_confidence'])}).",
        )

    def act(
        found: list[dict[str, Any]], picked: int | None, label: str | None, request: gr.Request
    ) -> tuple:
        if picked is None or not 0 <= int(picked) < len(found):
            raise gr.Error("click a suspected image first", print_exception=False)
        path = found[int(picked)]["path"]
        doc = service.fix_training_labels([path], label, who=app_user(request))
        done = f"moved into {label}" if label else "taken out of the training data"
        gr.Info(f"{done} (action {doc['action_id']})")
        return (*show(), "")

    with gr.Accordion(
        "Suspected label errors in the training data", open=False, elem_id="review-suspects"
    ) as section:
        words = gr.Markdown(elem_id="review-suspects-words")
        gallery = gr.Gallery(
            columns=8,
            height=300,
            object_fit="contain",
            allow_preview=False,
            label="Training images whose label looks wrong (given → suggested)",
            elem_id="review-suspects-gallery",
        )
        chosen = gr.Markdown(elem_id="review-suspects-chosen")
        with gr.Row():
            target = gr.Dropdown(label="Class", choices=[], elem_id="review-suspects-class")
            move = gr.Button("Move to this class", elem_id="review-suspects-move")
            remove = gr.Button("Take out of the training data", elem_id="review-suspects-remove")
    found = gr.State([])
    picked = gr.State(None)
    outputs = [gallery, words, target, picked, found]
    section.expand(user_errors(show), None, outputs, show_progress="hidden")
    gallery.select(pick, found, [picked, target, chosen], show_progress="hidden")
    moved = move.click(user_errors(act), [found, picked, target], [*outputs, chosen])

    def take_out(found: list[dict[str, Any]], picked: int | None, request: gr.Request) -> tuple:
        return act(found, picked, None, request)

    removed = remove.click(user_errors(take_out), [found, picked], [*outputs, chosen])
    return [moved, removed]
