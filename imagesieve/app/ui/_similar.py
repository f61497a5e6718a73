"""The Similar tab: the stored images nearest to an upload, a stored id or a class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import (
    Panel,
    class_names,
    distance_caption,
    gallery_value,
    reason_words,
    table_frame,
    user_errors,
)


def similar_tab(service: Service) -> Panel:
    columns = ["id", "distance", "label", "top1_class", "top1_prob", "cluster_id", "source"]

    def search(query: dict[str, Any], k: float, max_distance: float, where: str | None) -> tuple:
        info, results = service.similar(
            **query,
            k=int(k),
            max_distance=None if max_distance >= 2 else float(max_distance),
            where=(where or "").strip() or None,
        )
        rows = [r.to_dict() for r in results]
        gallery = gallery_value(service, ((r["id"], distance_caption(r)) for r in rows))
        what = {"image": "the uploaded image", "id": f"image #{info.value}"}.get(
            info.kind, f"the centre of class {info.value}"
        )
        text = f"**{len(rows)}** nearest to {what} (model {info.model_version}, {info.method}"
        if info.matching_rows is not None:
            text += f"; {info.matching_rows:,} stored images pass the filter"
        text += ")."
        if info.prediction:
            p = info.prediction
            why = " and ".join(reason_words(p.get("reason")))
            text += f" The uploaded image scores **{p['label']}**" + (f" ({why})." if why else ".")
        table = table_frame(columns, ([r[c] for c in columns] for r in rows))
        return text, gallery, table, [r["id"] for r in rows]

    @user_errors
    def by_image(path: str | None, k: float, max_distance: float, where: str | None) -> tuple:
        if not path:
            raise gr.Error("upload an image to search with", print_exception=False)
        return search({"image": Path(path).read_bytes()}, k, max_distance, where)

    @user_errors
    def by_id(id_: float | None, k: float, max_distance: float, where: str | None) -> tuple:
        if id_ is None:
            raise gr.Error("give a stored image id", print_exception=False)
        return search({"id": int(id_)}, k, max_distance, where)

    @user_errors
    def by_class(name: str | None, k: float, max_distance: float, where: str | None) -> tuple:
        if not name:
            raise gr.Error("pick a class", print_exception=False)
        return search({"class_name": name}, k, max_distance, where)

    def pick(ids: list[int], evt: gr.SelectData) -> Any:
        i = evt.index if isinstance(evt.index, int) else None
        return ids[i] if ids and i is not None and i < len(ids) else gr.skip()

    def refresh(current: str | None) -> Any:
        classes = class_names(service)
        value = current if current in classes else (classes[0] if classes else None)
        return gr.Dropdown(choices=classes, value=value)

    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs() as ways:
                with gr.Tab("By image", id="by-image"):
                    image = gr.Image(
                        label="Image",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        elem_id="similar-image",
                    )
                    image_button = gr.Button(
                        "Search", variant="primary", elem_id="similar-by-image"
                    )
                with gr.Tab("By id", id="by-id"):
                    id_box = gr.Number(label="Stored image id", precision=0, elem_id="similar-id")
                    id_button = gr.Button("Search", variant="primary", elem_id="similar-by-id")
                with gr.Tab("By class", id="by-class"):
                    class_box = gr.Dropdown(label="Class", choices=[], elem_id="similar-class")
                    class_button = gr.Button(
                        "Search", variant="primary", elem_id="similar-by-class"
                    )
        with gr.Column(scale=1):
            k = gr.Slider(1, 100, value=12, step=1, label="How many", elem_id="similar-k")
            max_distance = gr.Slider(
                0,
                2,
                value=2,
                step=0.01,
                label="Max distance (cosine; 2 = no limit)",
                elem_id="similar-max-distance",
            )
            where = gr.Textbox(
                label="Filter: SQL over predictions (optional)",
                placeholder="label = 'UNKNOWN' AND top1_prob > 0.8",
                elem_id="similar-where",
            )
    info = gr.Markdown(elem_id="similar-info")
    gallery = gr.Gallery(
        label="Similar stored images (click one to search from it)",
        columns=6,
        height=420,
        object_fit="contain",
        elem_id="similar-gallery",
    )
    table = gr.Dataframe(
        value=pd.DataFrame(columns=columns),
        interactive=False,
        label="Results",
        elem_id="similar-table",
    )
    ids = gr.State([])
    controls = [k, max_distance, where]
    outputs = [info, gallery, table, ids]
    image_button.click(by_image, [image, *controls], outputs)
    id_button.click(by_id, [id_box, *controls], outputs)
    id_box.submit(by_id, [id_box, *controls], outputs)
    class_button.click(by_class, [class_box, *controls], outputs)
    gallery.select(pick, ids, id_box).success(by_id, [id_box, *controls], outputs)
    return Panel(
        refresh,
        [class_box],
        [class_box],
        handles={"ways": ways, "id": id_box, "search": (by_id, [id_box, *controls], outputs)},
    )
