"""The Review tab's near-duplicate groups of stored images, with keep-one.

Groups come from ``Service.duplicates`` and keep-one goes through ``Service.keep_one``: the
calls the REST API and the CLI make.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import app_user, user_errors, version_or_none

#: Groups listed in the picker (largest first).
LISTED = 100


def duplicates_section(service: Service) -> list[Any]:
    """Build the section inside the current layout; returns the events that change data."""

    def show(chosen: int | None = None) -> tuple:
        if version_or_none(service) is None:
            return gr.Dropdown(choices=[], value=None), "No trained model yet.", [], [], None, ""
        doc = service.duplicates(limit=LISTED)
        groups = doc["near"]["groups"]
        choices = [
            (
                f"group {g['group_id']}: {g['size']} images"
                + (f", kept {g['kept']}" if g["kept"] else ""),
                g["group_id"],
            )
            for g in groups
        ]
        exact = doc["exact"]["total"]
        words = (
            f"**{doc['near']['total']}** groups of near-duplicate images (largest first)"
            + (f"; {exact} contents arrived under several names (stored once)" if exact else "")
            + ". Pick a group, click the image to keep, then set the others aside: they are "
            "not clustered and not promoted. The audit log undoes it."
            if groups or exact
            else "No near-duplicates among the stored images."
        )
        value = chosen if any(g["group_id"] == chosen for g in groups) else None
        if value is None and groups:
            value = groups[0]["group_id"]
        members = next((g["members"] for g in groups if g["group_id"] == value), [])
        items, shown = [], []
        for m in members:  # those whose image is still available
            path = service.thumbnail_file(m["sha256"], m["source"])
            if path is not None:
                aside = " · set aside" if m["duplicate_of"] else ""
                items.append((str(path), f"{m['id']} {m['label']}{aside}"))
                shown.append(m)
        return gr.Dropdown(choices=choices, value=value), words, items, shown, None, ""

    def pick_group(group_id: int | None) -> tuple:
        return show(group_id)

    def pick(shown: list[dict[str, Any]], evt: gr.SelectData) -> tuple:
        i = int(evt.index)
        if not 0 <= i < len(shown):
            return None, ""
        m = shown[i]
        return m["id"], f"Keep **{m['id']}** (`{m['source']}`, {m['label']})?"

    def keep(group_id: int | None, picked: int | None, request: gr.Request) -> tuple:
        if picked is None:
            raise gr.Error("click the image to keep first", print_exception=False)
        doc = service.keep_one(int(picked), who=app_user(request))
        gr.Info(f"kept {doc['kept']}, set {doc['set_aside']} aside (action {doc['action_id']})")
        return show(group_id)

    with gr.Accordion("Near-duplicate images", open=False, elem_id="review-duplicates") as section:
        words = gr.Markdown(elem_id="review-duplicates-words")
        group = gr.Dropdown(label="Group", choices=[], elem_id="review-duplicates-group")
        gallery = gr.Gallery(
            columns=8,
            height=260,
            object_fit="contain",
            allow_preview=False,
            label="Its images (id, label)",
            elem_id="review-duplicates-gallery",
        )
        chosen = gr.Markdown(elem_id="review-duplicates-chosen")
        keep_btn = gr.Button(
            "Keep this one, set the others aside", elem_id="review-duplicates-keep"
        )
    members = gr.State([])
    picked = gr.State(None)
    # every redraw of the group clears the pick: a pick is an image of the group on screen
    outputs = [group, words, gallery, members, picked, chosen]
    section.expand(user_errors(show), None, outputs, show_progress="hidden")
    group.input(user_errors(pick_group), group, outputs, show_progress="hidden")
    gallery.select(pick, members, [picked, chosen], show_progress="hidden")
    kept = keep_btn.click(user_errors(keep), [group, picked], outputs)
    return [kept]
