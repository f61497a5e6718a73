"""The Gradio app: Predict, Batch, Review, Similar, History, Unknowns, Model over one ``Service``.

Every tab calls the same ``Service`` methods as the REST API and the CLI; this package only
turns their results into components. ``build_app`` builds the Blocks and starts nothing: the
server mounts it (``imagesieve serve``). Errors reach the user as one line in a toast
(``gr.Error``), never as a traceback; long work (batches, clustering, training) shows progress.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from imagesieve.app._service import Service
from imagesieve.app.ui._batch import batch_tab
from imagesieve.app.ui._history import history_tab
from imagesieve.app.ui._model import model_tab
from imagesieve.app.ui._predict import predict_tab
from imagesieve.app.ui._review import review_tab
from imagesieve.app.ui._similar import similar_tab
from imagesieve.app.ui._unknowns import unknowns_tab
from imagesieve.app.ui._widgets import Downloads, Panel

__all__ = ["build_app"]


def _header_md(service: Service) -> tuple[str, dict[str, int]]:
    """The header's text and its counts (the Unknowns tab shows the clusters to review)."""
    health = service.health()
    if health.get("model_version") is None:
        return (
            f"**imagesieve** · workspace `{health['workspace']}` · no trained model yet: run "
            "`imagesieve train DATA_DIR` or `imagesieve demo`"
        ), {}
    classes = ", ".join(health.get("classes", []))
    n = service.counts()
    return (
        f"**imagesieve** · workspace `{health['workspace']}` · model **{health['model_version']}**"
        f" ({classes}) · **{n['stored']:,}** stored images · **{n['unknown']:,}** UNKNOWN · "
        f"**{n['clusters']:,}** clusters to review · **{n['labelled']:,}** labelled by people"
    ), n


def build_app(service: Service) -> gr.Blocks:
    """The Gradio app over ``service``; nothing runs until the server mounts or launches it."""
    downloads = Downloads()
    with gr.Blocks(title="imagesieve", delete_cache=(3600, 86400)) as demo:
        header = gr.Markdown(elem_id="app-header")
        panels: list[tuple[Any, Panel]] = []
        handles: dict[str, dict[str, Any]] = {}
        with gr.Tabs(elem_id="tabs") as tabs:
            for title, make in (
                ("Predict", predict_tab),
                ("Batch", batch_tab),
                ("Review", review_tab),
                ("Similar", similar_tab),
                ("History", lambda service: history_tab(service, downloads)),
                # the Review tab's filters, for Unknowns to open a cluster there
                ("Unknowns", lambda service: unknowns_tab(service, (tabs, handles["Review"]))),
                ("Model", model_tab),
            ):
                with gr.Tab(title, id=title.lower(), elem_id=f"tab-{title.lower()}") as tab:
                    panels.append((tab, make(service)))
                    handles[title] = panels[-1][1].handles

        # An image in the Review tab links to its look-alikes in the Similar tab.
        rv, sm = handles["Review"], handles["Similar"]
        search, inputs, outputs = sm["search"]
        rv["similar"].click(
            lambda row: (
                (gr.Tabs(selected="similar"), gr.Tabs(selected="by-id"), row["id"])
                if row
                else (gr.skip(),) * 3
            ),
            rv["focus"],
            [tabs, sm["ways"], sm["id"]],
        ).then(search, inputs, outputs)

        unknowns = next(tab for tab, _ in panels if tab.id == "unknowns")

        def header_now() -> tuple:
            text, counts = _header_md(service)
            n = counts.get("clusters", 0)
            return text, gr.Tab(label=f"Unknowns ({n})" if n else "Unknowns")

        header = [header, unknowns]
        demo.load(header_now, None, header)
        for tab, panel in panels:
            tab.select(header_now, None, header, show_progress="hidden")
            if panel.refresh is not None:
                demo.load(panel.refresh, panel.inputs, panel.outputs)
            if panel.on_open is not None:
                panel.on_open(tab)
            elif panel.refresh is not None:
                tab.select(panel.refresh, panel.inputs, panel.outputs)
        for event in (e for _, panel in panels for e in panel.store_changes):
            event.then(header_now, None, header, show_progress="hidden")
        for changed in (event for _, panel in panels for event in panel.model_changes):
            changed.success(header_now, None, header)
            for _, panel in panels:
                if panel.refresh is not None:
                    changed.success(panel.refresh, panel.inputs, panel.outputs)
    return demo
