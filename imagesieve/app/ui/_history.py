"""The History tab: read-only SQL over everything stored, its views and a chart per day."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gradio as gr
import pandas as pd

from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import Downloads, Panel, table_cell, user_errors, version_or_none
from imagesieve.ingest import drift_words
from imagesieve.store import VIEWS


def _unique_headers(columns: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for c in columns:
        n = seen.get(c, 0)
        seen[c] = n + 1
        out.append(c if n == 0 else f"{c}_{n + 1}")
    return out


def _frame(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> pd.DataFrame:
    return pd.DataFrame(
        [[table_cell(v) for v in r] for r in rows], columns=_unique_headers(columns)
    )


def history_tab(service: Service, downloads: Downloads) -> Panel:
    @user_errors
    def run(sql: str | None, limit: float | None) -> tuple:
        if not (sql or "").strip():
            raise gr.Error("write a query first", print_exception=False)
        result = service.sql(sql, limit=int(limit or 1000))
        path = downloads.path("query.csv")
        result.to_csv(path)
        n = len(result.rows)
        more = " (row limit reached: more rows were not fetched)" if result.truncated else ""
        return (
            f"{n:,} row{'' if n == 1 else 's'} in {result.seconds:.2f} s{more}",
            gr.Dataframe(value=_frame(result.columns, result.rows), visible=True),
            gr.DownloadButton(value=str(path), visible=True),
        )

    def view(name: str) -> Callable[[float | None], tuple]:
        sql = f"SELECT * FROM {name}"

        def show(limit: float | None) -> tuple:
            return (sql, *run(sql, limit))

        return show

    def drift_md() -> str:
        """The newest batches' drift: those that departed from the training data marked."""
        rows = [r for r in service.drift("batch", limit=200) if r["ks_d"] is not None]
        if not rows:
            return ""
        departed = [r for r in rows if r["drifted"]]
        lines = [
            f"**Drift** (each batch's distances to the training data against held-out known "
            f"images', KS test; view `drift_per_batch`): **{len(departed)}** of the "
            f"{len(rows)} newest batches departed."
        ]
        lines += [
            f"- ⚠ batch **{r['batch_id']}** ({r['model_version']}, {r['images']:,} images): "
            f"{drift_words(r)}"
            for r in departed[:10]
        ]
        return "\n".join(lines)

    def refresh() -> tuple:
        return (*chart(), drift_md())

    def chart() -> tuple:
        """The chart, or, with nothing stored yet, a line saying so (never an empty chart)."""
        rows = []
        if version_or_none(service) is not None:
            rows = service.sql(
                "SELECT CAST(day AS VARCHAR) AS day, label, CAST(sum(n) AS BIGINT) AS n "
                "FROM predictions_per_day WHERE n > 0 GROUP BY ALL ORDER BY day, label",
                limit=100_000,
            ).rows
        if not rows:
            return gr.BarPlot(
                visible=False
            ), "No scored images yet: the chart per day appears then."
        return gr.BarPlot(value=pd.DataFrame(rows, columns=["day", "label", "n"]), visible=True), ""

    gr.Markdown(
        "Read-only SQL over everything stored (tables `predictions`, `batches`, `failures`, "
        "`clusters`, …; one SELECT at a time). The ready-made views, one click away:"
    )
    with gr.Row():
        buttons = {name: gr.Button(name, size="sm", elem_id=f"view-{name}") for name in VIEWS}
    gr.Markdown("\n".join(f"- **{n}**: {d}" for n, d in VIEWS.items()))
    sql = gr.Textbox(
        label="SQL",
        lines=4,
        value="SELECT label, count(*) AS n FROM predictions GROUP BY label ORDER BY n DESC",
        elem_id="history-sql",
    )
    with gr.Row():
        limit = gr.Number(label="Row limit", value=1000, precision=0, minimum=1)
        start = gr.Button("Run query", variant="primary", elem_id="history-run")
        csv_button = gr.DownloadButton("Download CSV", visible=False, elem_id="history-csv")
    status = gr.Markdown(elem_id="history-status")
    table = gr.Dataframe(
        interactive=False,
        visible=False,  # until there is a result: an empty table shows made-up headers
        label="Result",
        max_height=480,
        elem_id="history-table",
    )
    plot = gr.BarPlot(
        value=pd.DataFrame({"day": [], "label": [], "n": []}),
        x="day",
        y="n",
        color="label",
        title="Predictions per day by label (UTC day of their latest scoring)",
        x_title="day",
        y_title="images",
        height=300,
        visible=False,
        elem_id="history-chart",
    )
    chart_note = gr.Markdown(elem_id="history-chart-note")
    drift = gr.Markdown(elem_id="history-drift")
    start.click(run, [sql, limit], [status, table, csv_button])
    for name, button in buttons.items():
        button.click(user_errors(view(name)), limit, [sql, status, table, csv_button])
    return Panel(user_errors(refresh), [plot, chart_note, drift])
