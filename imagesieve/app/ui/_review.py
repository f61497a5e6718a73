"""The Review tab: a paged grid over every stored image, filters, multi-select, relabel, undo.

The grid is one ``gr.HTML`` whose value is the page (tiles with cached WebP thumbnails inline)
and the selection; clicks and keys are handled in the browser, and a key that acts (1-9, J, K,
Z) reaches Python as the grid's ``submit`` event. Pages come from ``Service.browse``, actions
from ``Service.relabel`` and ``Service.undo``: the calls the REST API and the CLI make.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import gradio as gr

from imagesieve.app._service import Service
from imagesieve.app.ui._duplicates import duplicates_section
from imagesieve.app.ui._suspects import suspects_section
from imagesieve.app.ui._widgets import (
    REASON_WORDS,
    Panel,
    app_user,
    class_names,
    progress_relay,
    reason_words,
    user_errors,
    version_or_none,
)
from imagesieve.classifier import QUALITY_KINDS, REASONS, UNKNOWN
from imagesieve.store import ImageQuery

#: Most images a map selection opens in the grid.
MAX_PICKED = 50_000
#: Page sizes offered.
PAGE_SIZES = [24, 48, 96]
#: Sort keys in the user's words.
SORT_WORDS = {
    "id": "oldest first",
    "-id": "newest first",
    "confidence": "least confident first",
    "-confidence": "most confident first",
    "-distance": "furthest from training first",
    "distance": "nearest to training first",
    "outlier": "least typical in its cluster first",
}
#: The keys the grid answers, shown on screen.
KEYS_HELP = (
    "**Keys** (grid focused or anywhere outside a text box): click selects, shift-click "
    "selects a range, **A** selects the page, **Esc** clears; **1-9** relabel the selection to "
    "class 1-9 (listed under *Relabel*); **U** marks it UNKNOWN (no class: it leaves any "
    "class a person put it in); **X** leaves it out of its cluster's promotion; **J** / **K** "
    "next / previous page; **Z** undo the last action. A double-click shows an image's row "
    "with links to its look-alikes, its cluster and its batch."
)

GRID_TEMPLATE = """
<div class="rv-grid" tabindex="0">
${(value.tiles || []).map(t => `
  <figure class="rv-tile ${(value.selected || []).includes(t.id) ? 'rv-sel' : ''} ${t.kind}"
      data-id="${t.id}" title="${t.title}">
    ${t.src ? `<img src="${t.src}" alt="image ${t.id}">` : `<div class="rv-missing">no longer available</div>`}
    <figcaption>${t.caption}</figcaption>
  </figure>`).join('')}
</div>
${(value.tiles || []).length ? '' : '<p class="rv-empty">No stored images match these filters.</p>'}
"""

GRID_CSS = """
.rv-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
  gap: 8px; outline: none; }
.rv-tile { margin: 0; padding: 4px; border: 3px solid transparent; border-radius: 6px;
  cursor: pointer; background: var(--block-background-fill); user-select: none; }
.rv-tile img { width: 100%; aspect-ratio: 1; object-fit: contain; display: block; }
.rv-tile figcaption { font-size: 12px; line-height: 1.3; color: var(--body-text-color);
  overflow-wrap: anywhere; }
.rv-tile.rv-sel { border-color: var(--color-accent); background: var(--color-accent-soft); }
.rv-tile.rv-unknown figcaption b { color: var(--error-text-color, #b91c1c); }
.rv-missing { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  font-size: 12px; color: var(--body-text-color-subdued); }
.rv-empty { color: var(--body-text-color-subdued); }
"""

GRID_JS = """
const selected = () => new Set(props.value.selected || []);
const ids = () => (props.value.tiles || []).map(t => t.id);
let anchor = null;
function setSelection(set) {
  props.value = {...props.value, selected: ids().filter(i => set.has(i)), key: ''};
}
element.addEventListener('click', (ev) => {
  const tile = ev.target.closest('.rv-tile');
  if (!tile) return;
  const id = Number(tile.dataset.id);
  const set = selected();
  if (ev.shiftKey && anchor !== null) {
    const all = ids(), a = all.indexOf(anchor), b = all.indexOf(id);
    all.slice(Math.min(a, b), Math.max(a, b) + 1).forEach(i => set.add(i));
  } else if (set.has(id)) {
    set.delete(id);
  } else {
    set.add(id);
  }
  anchor = id;
  setSelection(set);
});
element.addEventListener('dblclick', (ev) => {
  const tile = ev.target.closest('.rv-tile');
  if (!tile) return;
  props.value = {...props.value, focus: Number(tile.dataset.id), key: ''};
  trigger('double_click');
});
// The page-wide key listener is installed once; it calls the grid mounted last.
window.imagesieveReviewKey = (key) => {
  key = key.toLowerCase();
  if (key === 'a') { setSelection(new Set(ids())); return true; }
  if (key === 'escape') { setSelection(new Set()); return true; }
  if (!/^[1-9jkzux]$/.test(key)) return false;
  const n = (props.value.selected || []).length;
  if (/^[1-9u]$/.test(key)) {
    const name = key === 'u' ? 'UNKNOWN' : (props.value.classes || [])[Number(key) - 1];
    if (!name || !n) return true;
    if (n > 1 && !confirm(`Relabel ${n} images as ${name}?`)) return true;
  }
  if (key === 'x') {
    if (!n) return true;
    if (n > 1 && !confirm(`Leave ${n} images out of their cluster's promotion?`)) return true;
  }
  props.value = {...props.value, key: key, nonce: Date.now()};
  trigger(key === 'j' || key === 'k' ? 'input' : 'submit');  // paging changes nothing stored
  return true;
};
if (!window.imagesieveReviewKeys) {
  window.imagesieveReviewKeys = true;
  document.addEventListener('keydown', (ev) => {
    const grid = document.querySelector('#review-grid');
    if (!grid || grid.offsetParent === null) return;  // the Review tab is not showing
    const t = ev.target;
    if (t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName))) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) return;
    if (window.imagesieveReviewKey(ev.key)) ev.preventDefault();
  });
}
"""

MAP_TEMPLATE = """
<div class="mp-wrap">
  <canvas class="mp-canvas" width="960" height="560" tabindex="0"></canvas>
  <div class="mp-legend"></div>
</div>
"""

MAP_CSS = """
.mp-wrap { display: flex; gap: 12px; align-items: flex-start; flex-wrap: wrap; }
.mp-canvas { border: 1px solid var(--border-color-primary); border-radius: 6px;
  background: #ffffff; cursor: crosshair; max-width: 100%; touch-action: none; }
.mp-legend { font-size: 13px; line-height: 1.6; color: var(--body-text-color); min-width: 160px; }
.mp-legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
  margin-right: 6px; vertical-align: -1px; }
"""

MAP_JS = """
const canvas = element.querySelector('canvas');
const ctx = canvas.getContext('2d', {willReadFrequently: true});
// The points come from a server function, never through a prop: Gradio clones every
// component's props on each event, and 50,000 points made each event of the page 1-2 s slower.
let points = {}, loaded = null, base = null, px = null, py = null, drag = null, chosen = new Set();
async function reload() {
  const want = `${props.value.stamp}|${props.value.color}`;
  if (!props.value.stamp || want === loaded) return;
  loaded = want;
  points = await server.map_data([props.value.stamp, props.value.color]);
  chosen = new Set();
  draw();
}
function layout() {
  const p = points || {}, n = (p.ids || []).length, W = canvas.width, H = canvas.height;
  px = new Float32Array(n); py = new Float32Array(n);
  for (let i = 0; i < n; i++) { px[i] = 6 + p.x[i] * (W - 12); py[i] = 6 + (1 - p.y[i]) * (H - 12); }
}
function draw() {
  const p = points || {}, n = (p.ids || []).length, legend = p.legend || [];
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!n) { base = null; element.querySelector('.mp-legend').innerHTML = ''; canvas.dataset.drawn = '0'; return; }
  layout();
  const byColour = legend.map(() => []);
  for (let i = 0; i < n; i++) byColour[p.c[i]].push(i);
  // the largest group first, so the small ones (new kinds, noise) stay visible on top
  byColour.forEach((idx, k) => {
    ctx.fillStyle = legend[k][1];
    for (const i of idx) ctx.fillRect(px[i] - 1, py[i] - 1, 2.5, 2.5);
  });
  ctx.fillStyle = '#111';
  for (const i of chosen) ctx.fillRect(px[i] - 2, py[i] - 2, 4, 4);
  base = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const esc = s => String(s).replace(/[&<>"']/g, ch => `&#${ch.charCodeAt(0)};`);
  element.querySelector('.mp-legend').innerHTML = legend.map(
    ([name, colour, count]) => `<div><i style="background:${colour}"></i>${esc(name)} (${count.toLocaleString()})</div>`
  ).join('');
  canvas.dataset.drawn = String(n);
}
function at(ev) {
  const r = canvas.getBoundingClientRect();
  return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
}
function inside(poly, x, y) {
  let c = false;
  for (let i = 0, j = poly.length - 1; i < poly.length; j = i++) {
    const [xi, yi] = poly[i], [xj, yj] = poly[j];
    if ((yi > y) !== (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) c = !c;
  }
  return c;
}
canvas.addEventListener('pointerdown', ev => {
  if (!base) return;
  drag = {lasso: ev.shiftKey, start: at(ev), path: [at(ev)]};
  canvas.setPointerCapture(ev.pointerId);
});
canvas.addEventListener('pointermove', ev => {
  if (!drag) return;
  const [x, y] = at(ev);
  drag.path.push([x, y]);
  ctx.putImageData(base, 0, 0);
  ctx.strokeStyle = '#111'; ctx.lineWidth = 1.5; ctx.setLineDash([5, 3]);
  ctx.beginPath();
  if (drag.lasso) { drag.path.forEach(([a, b], k) => k ? ctx.lineTo(a, b) : ctx.moveTo(a, b)); ctx.closePath(); }
  else { const [x0, y0] = drag.start; ctx.rect(x0, y0, x - x0, y - y0); }
  ctx.stroke(); ctx.setLineDash([]);
});
canvas.addEventListener('pointerup', async ev => {
  if (!drag) return;
  const [x1, y1] = at(ev), [x0, y0] = drag.start, p = points || {};
  const poly = drag.lasso ? drag.path : [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
  drag = null;
  if (poly.length < 3 || (Math.abs(x1 - x0) < 3 && Math.abs(y1 - y0) < 3 && !ev.shiftKey)) { draw(); return; }
  chosen = new Set();
  for (let i = 0; i < px.length; i++) if (inside(poly, px[i], py[i])) chosen.add(i);
  draw();
  const ids = [...chosen].map(i => p.ids[i]);
  const token = await server.remember_pick(ids);
  props.value = {...props.value, picked: token, count: ids.length};
  trigger('submit');
});
watch('value', reload);
reload();
"""

#: Asks before a relabel from the button, saying how many images it touches.
CONFIRM_RELABEL = """(g, t, n, c, ...rest) => {
  const k = (g.selected || []).length, name = (n || '').trim() || t;
  const ok = !!(k && name) && confirm(`Relabel ${k} image${k === 1 ? '' : 's'} as ${name}?`);
  return [g, t, n, ok, ...rest];
}"""


def _tile(r: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    """One grid tile: the thumbnail inline, a caption without truncation, HTML-escaped."""
    src = "data:image/webp;base64," + base64.b64encode(data).decode() if data else None
    label = html.escape(r["label"])
    why = ", ".join(reason_words(r["reason"]))
    parts = [f"<b>{label}</b>" + (f" ({html.escape(why)})" if why else "")]
    if r["top1_prob"] is not None:
        parts.append(f"{html.escape(r['top1_class'] or '')} {r['top1_prob']:.0%}")
    if r["neighbor_distance"] is not None:
        parts.append(f"d {r['neighbor_distance']:.3f}")
    if r["human_label"]:
        parts.append(f"✔ {html.escape(r['human_label'])}")
    name = r["source"].replace("\\", "/").rsplit("/", 1)[-1]
    return {
        "id": int(r["id"]),
        "src": src,
        "caption": f"#{r['id']} · " + " · ".join(parts),
        "title": html.escape(name, quote=True),
        "kind": "rv-unknown" if r["label"] == UNKNOWN else "",
    }


def review_tab(service: Service) -> Panel:
    def query_of(
        labels: list[str] | None,
        reasons: list[str] | None,
        quality: list[str] | None,
        duplicates: list[str] | None,
        classes: list[str] | None,
        person: str | None,
        max_conf: float | None,
        distance: float | None,
        cluster: str | None,
        batch: str | None,
        days: str | None,
        sort: str,
        ids: list[int] | None = None,
    ) -> ImageQuery:
        day_from, day_to = _days(days)
        return ImageQuery(
            labels=tuple(labels) if labels else None,
            reasons=tuple(reasons) if reasons else None,
            quality=tuple(quality) if quality else None,
            duplicates=tuple(duplicates) if duplicates else None,
            top1_classes=tuple(classes) if classes else None,
            human_labels=None
            if person in (None, "any")
            else ("" if person == "nobody" else person,),
            max_confidence=None if max_conf is None or max_conf >= 1 else float(max_conf),
            min_distance=float(distance) if distance else None,
            cluster_ids=(_ints(cluster, "cluster"),) if cluster else None,
            batch_ids=(_ints(batch, "batch"),) if batch else None,
            day_from=day_from,
            day_to=day_to,
            sort=next((k for k, w in SORT_WORDS.items() if w == sort), "id"),
            ids=tuple(ids) if ids is not None else None,
        )

    def view(page: float, size: float, filters: Any, selected: Sequence[int] = ()) -> tuple:
        """The tab's outputs for a page: the grid (keeping ``selected``), summary, pager, actions."""
        query, page, size = query_of(*filters), int(page or 1), int(size)
        return (*page_of(query, page, size, selected), _audit_md(service))

    def page_of(query: ImageQuery, page: int, size: int, selected: Sequence[int]) -> tuple:
        found = service.browse(query, limit=size, offset=max(0, int(page) - 1) * size, facets=False)
        pages = max(1, -(-found["total"] // size))
        if found["total"] and not found["rows"] and page > 1:  # past the end: the last page
            return page_of(query, pages, size, selected)
        thumbs = service.thumbnails(found["rows"])
        tiles = [_tile(r, data) for r, data in zip(found["rows"], thumbs, strict=True)]
        if int(page) < pages:
            service.prefetch_page(query, size, int(page) * size)
        on_page = {t["id"] for t in tiles}
        value = {
            "tiles": tiles,
            "selected": [i for i in selected if i in on_page],
            "classes": class_names(service),
            "key": "",
        }
        first = (int(page) - 1) * size + 1
        summary = (
            f"Images **{first:,}–{first + len(tiles) - 1:,}** of **{found['total']:,}** "
            f"(page {int(page)} of {pages})"
            if tiles
            else "No stored images match these filters."
        )
        if query.ids is not None:
            summary += f" · within the {len(query.ids):,} selected on the map"
        return value, summary, gr.Number(value=int(page), maximum=pages)

    @user_errors
    def show(page: float, size: float, *filters: Any) -> tuple:
        return view(page, size, filters)

    @user_errors
    def act(grid: dict, page: float, size: float, request: gr.Request, *filters: Any) -> tuple:
        """A key pressed on the grid: relabel to class 1-9 or UNKNOWN, exclude, page, undo."""
        key = (grid or {}).get("key", "")
        selected = list((grid or {}).get("selected", []))
        page = int(page or 1)
        if key in ("j", "k"):
            page = max(1, page + (1 if key == "j" else -1))
            selected = []
        elif key == "z":
            entry = service.undo(who=app_user(request))
            gr.Info(entry["summary"])
        elif key == "x" and selected:
            done = service.exclude_images(selected, who=app_user(request))
            gr.Info(_exclude_words(done))
        elif key.isdigit() or key == "u":
            classes = class_names(service)
            name = UNKNOWN if key == "u" else dict(enumerate(classes, 1)).get(int(key))
            if name and selected:
                result = service.relabel(selected, name, who=app_user(request))
                gr.Info(_relabel_words(result))
        return view(page, size, filters, selected)

    @user_errors
    def relabel(
        grid: dict,
        target: str | None,
        new_type: str | None,
        confirmed: bool,
        page: float,
        size: float,
        request: gr.Request,
        *filters: Any,
    ) -> tuple:
        selected = list((grid or {}).get("selected", []))
        name = (new_type or "").strip() or target
        if not selected:
            raise gr.Error(
                "select images first (click them, or A for the page)", print_exception=False
            )
        if not name:
            raise gr.Error("pick a class, or type the name of a new type", print_exception=False)
        if not confirmed:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        result = service.relabel(selected, name, who=app_user(request))
        gr.Info(_relabel_words(result))
        return view(page, size, filters, selected)

    @user_errors
    def undo(page: float, size: float, request: gr.Request, *filters: Any) -> tuple:
        entry = service.undo(who=app_user(request))
        gr.Info(entry["summary"])
        return view(page, size, filters)

    def refresh(current: str | None) -> tuple:
        classes = class_names(service)
        keyed = [f"{i + 1}: {c}" for i, c in enumerate(classes[:9])]
        help_md = KEYS_HELP + ("  \nClasses: " + " · ".join(keyed) if keyed else "")
        return (
            gr.Dropdown(choices=[*classes, UNKNOWN], value=None),
            gr.Dropdown(choices=classes, value=None),
            gr.Dropdown(choices=classes, value=current if current in classes else None),
            gr.Dropdown(choices=["any", "nobody", *classes, UNKNOWN], value="any"),
            help_md,
        )

    gr.Markdown(
        "Every stored image of the active model, page by page. Filter, select, and relabel: "
        "a relabelled image joins its class's training data; every action can be undone."
    )
    with gr.Row():
        f_label = gr.Dropdown(label="Label", multiselect=True, choices=[], elem_id="review-label")
        f_reason = gr.Dropdown(
            label="UNKNOWN reason",
            multiselect=True,
            choices=[(REASON_WORDS[r], r) for r in REASONS],
            elem_id="review-reason",
        )
        f_quality = gr.Dropdown(
            label="Photo quality",
            multiselect=True,
            choices=[(k.replace("_", " "), k) for k in QUALITY_KINDS] + [("good", "")],
            elem_id="review-quality",
        )
        f_dups = gr.Dropdown(
            label="Near-duplicates",
            multiselect=True,
            choices=[
                ("no near-duplicate", "none"),
                ("kept of a group", "kept"),
                ("set aside", "set_aside"),
            ],
            elem_id="review-duplicates-filter",
        )
        f_class = gr.Dropdown(
            label="Top-1 class", multiselect=True, choices=[], elem_id="review-class"
        )
        f_person = gr.Dropdown(
            label="Labelled by a person", choices=["any"], value="any", elem_id="review-person"
        )
    with gr.Row():
        f_conf = gr.Slider(
            0,
            1,
            value=1,
            step=0.01,
            label="Top-1 confidence at most",
            elem_id="review-max-confidence",
        )
        f_dist = gr.Number(label="Distance at least", minimum=0, elem_id="review-min-distance")
        f_cluster = gr.Textbox(
            label="Cluster id", placeholder="e.g. 3 (-1: noise)", elem_id="review-cluster"
        )
        f_batch = gr.Textbox(label="Batch id", placeholder="e.g. 12", elem_id="review-batch")
        f_days = gr.Textbox(
            label="Scored on (UTC day or range)",
            placeholder="2026-12-04 or 2026-12-01..2026-12-04",
            elem_id="review-days",
        )
        f_sort = gr.Dropdown(
            label="Order",
            choices=list(SORT_WORDS.values()),
            value=SORT_WORDS["id"],
            elem_id="review-sort",
        )
    summary = gr.Markdown(elem_id="review-summary")
    with gr.Group(visible=False, elem_id="review-details-box") as details_box:
        details = gr.Markdown(elem_id="review-details")
        with gr.Row():
            similar_button = gr.Button("Look-alikes (Similar)", size="sm", elem_id="review-similar")
            cluster_button = gr.Button("Its cluster", size="sm", elem_id="review-its-cluster")
            batch_button = gr.Button("Its batch", size="sm", elem_id="review-its-batch")
            close_button = gr.Button("Close", size="sm", elem_id="review-details-close")
    focus = gr.State(None)  # the stored row shown in the details
    grid = gr.HTML(
        value={"tiles": [], "selected": [], "classes": [], "key": ""},
        html_template=GRID_TEMPLATE,
        css_template=GRID_CSS,
        js_on_load=GRID_JS,
        elem_id="review-grid",
    )
    with gr.Row():
        prev_button = gr.Button("◀ Previous (K)", elem_id="review-prev", scale=1)
        page = gr.Number(
            value=1, label="Page", precision=0, minimum=1, elem_id="review-page", scale=1
        )
        size = gr.Dropdown(
            label="Per page", choices=PAGE_SIZES, value=48, elem_id="review-size", scale=1
        )
        next_button = gr.Button("Next (J) ▶", elem_id="review-next", scale=1)
    with gr.Row():
        target = gr.Dropdown(label="Relabel to", choices=[], elem_id="review-target", scale=2)
        new_type = gr.Textbox(
            label="…or a new type",
            placeholder="name of a new class",
            elem_id="review-new-type",
            scale=2,
        )
        relabel_button = gr.Button(
            "Relabel selected", variant="primary", elem_id="review-relabel", scale=1
        )
        undo_button = gr.Button("Undo last action (Z)", elem_id="review-undo", scale=1)
    keys = gr.Markdown(KEYS_HELP, elem_id="review-keys")
    with gr.Accordion("Embedding map", open=False, elem_id="review-map-panel") as map_panel:
        gr.Markdown(
            "Every stored image as a point (a sample beyond 50,000): look-alikes lie close. "
            "**Drag** a box or **shift-drag** a lasso: the images inside open in the grid above."
        )
        with gr.Row():
            color_by = gr.Radio(
                [
                    ("predicted label", "label"),
                    ("UNKNOWN reason", "reason"),
                    ("cluster", "cluster"),
                    ("Top-1 class", "class"),
                ],
                value="label",
                label="Colour by",
                elem_id="review-map-color",
            )
            make_button = gr.Button("Make / update the map", elem_id="review-map-make")
            clear_button = gr.Button("Clear the map selection", elem_id="review-map-clear")
        map_status = gr.Markdown(elem_id="review-map-status")
        drawn: OrderedDict[str, dict[str, Any]] = OrderedDict()
        picks: OrderedDict[str, list[int]] = OrderedDict()

        def map_data(asked: list[str]) -> dict[str, Any]:
            """The points of the map shown at (stamp, colour), as made when it was asked for.

            A server function takes one argument: the browser's arguments as a list.
            """
            stamp, color = (list(asked) + ["", "label"])[:2]
            doc = drawn.pop(str(stamp), None)
            return doc if doc is not None else service.embedding_map(str(color))

        def remember_pick(ids: list[int]) -> str:
            """Keep a map selection on the server; the browser sends back only its token."""
            token = uuid.uuid4().hex
            picks[token] = [int(i) for i in list(ids)[:MAX_PICKED]]
            while len(picks) > 16:
                picks.popitem(last=False)
            return token

        emap = gr.HTML(
            value={"stamp": "", "color": "label", "picked": "", "count": 0},
            html_template=MAP_TEMPLATE,
            css_template=MAP_CSS,
            js_on_load=MAP_JS,
            server_functions=[map_data, remember_pick],
            elem_id="review-map",
        )
    suspect_changes = suspects_section(service)
    duplicate_changes = duplicates_section(service)
    audit = gr.Markdown(elem_id="review-audit")
    confirmed = gr.Checkbox(value=False, visible=False)
    sel_ids = gr.State(None)

    filters = [
        f_label,
        f_reason,
        f_quality,
        f_dups,
        f_class,
        f_person,
        f_conf,
        f_dist,
        f_cluster,
        f_batch,
        f_days,
        f_sort,
    ]
    filters.append(sel_ids)
    outputs = [grid, summary, page, audit]

    def to_first(*args: Any) -> tuple:
        return show(1, *args)

    for control in (f_label, f_reason, f_quality, f_dups, f_class, f_person, f_sort):
        control.change(to_first, [size, *filters], outputs, show_progress="hidden")
    for control in (f_dist, f_cluster, f_batch, f_days):
        control.submit(to_first, [size, *filters], outputs, show_progress="hidden")
    f_conf.release(to_first, [size, *filters], outputs, show_progress="hidden")
    size.change(to_first, [size, *filters], outputs, show_progress="hidden")
    page.submit(show, [page, size, *filters], outputs, show_progress="hidden")
    next_button.click(lambda p: int(p or 1) + 1, page, page, show_progress="hidden").then(
        show, [page, size, *filters], outputs, show_progress="hidden"
    )
    prev_button.click(lambda p: max(1, int(p or 1) - 1), page, page, show_progress="hidden").then(
        show, [page, size, *filters], outputs, show_progress="hidden"
    )
    grid.input(act, [grid, page, size, *filters], outputs, show_progress="hidden")  # J / K
    acted = grid.submit(act, [grid, page, size, *filters], outputs, show_progress="hidden")
    relabelled = relabel_button.click(
        relabel,
        [grid, target, new_type, confirmed, page, size, *filters],
        outputs,
        js=CONFIRM_RELABEL,
        show_progress="hidden",
    )
    undone = undo_button.click(undo, [page, size, *filters], outputs, show_progress="hidden")

    @user_errors
    def show_details(grid_value: dict) -> tuple:
        id_ = (grid_value or {}).get("focus")
        if id_ is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        found = service.browse(ImageQuery(ids=(int(id_),)), limit=1, facets=False)["rows"]
        if not found:
            raise gr.Error(f"image #{id_} is no longer stored", print_exception=False)
        r = found[0]
        clustered = r["cluster_id"] is not None and r["cluster_id"] >= 0
        return (
            r,
            gr.Group(visible=True),
            _details_md(r),
            gr.Button(visible=clustered, value=f"Its cluster ({r['cluster_id']})"),
            gr.Button(value=f"Its batch ({r['batch_id']})"),
        )

    def filter_on(what: str) -> Any:
        def pick(row: dict | None) -> tuple:
            if not row:
                return gr.skip(), gr.skip()
            value = str(row["cluster_id"] if what == "cluster" else row["batch_id"])
            return (value, "") if what == "cluster" else ("", value)

        return pick

    grid.double_click(
        show_details,
        grid,
        [focus, details_box, details, cluster_button, batch_button],
        show_progress="hidden",
    )
    close_button.click(lambda: gr.Group(visible=False), None, details_box)
    for button, what in ((cluster_button, "cluster"), (batch_button, "batch")):
        button.click(filter_on(what), focus, [f_cluster, f_batch]).then(
            to_first, [size, *filters], outputs, show_progress="hidden"
        )

    def map_words(doc: dict[str, Any]) -> str:
        making = service.map_status
        if making.get("running"):
            return "The map is being made (about a minute per 50,000 images)…"
        if making.get("error"):
            return f"The map could not be made: {html.escape(making['error'])}"
        if not doc["points"]:
            return "No map yet for this model: **Make / update the map** (runs in the background)."
        grown = doc["stored"] - doc["stored_when_made"]
        text = f"{doc['points']:,} of {doc['stored']:,} stored images"
        return text + (f" · {grown:,} stored since it was made: update it" if grown > 0 else "")

    @user_errors
    def show_map(color: str) -> tuple:
        doc = service.embedding_map(color)
        stamp = f"{time.time():.6f}"
        drawn[stamp] = doc  # handed to the browser by map_data, once
        while len(drawn) > 8:
            drawn.popitem(last=False)
        return {"stamp": stamp, "color": color, "picked": "", "count": 0}, map_words(doc)

    @user_errors
    def make_map(color: str, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        service.make_map(progress=progress_relay(progress, unit="steps"))
        return show_map(color)

    @user_errors
    def pick_on_map(value: dict, size: float, *filters: Any) -> tuple:
        ids = picks.pop(str((value or {}).get("picked", "")), None)
        if ids is None:
            return (gr.skip(),) * 5
        *rest, _ = filters
        return (ids, *show(1, size, *rest, ids))

    map_panel.expand(show_map, color_by, [emap, map_status], show_progress="hidden")
    color_by.change(show_map, color_by, [emap, map_status], show_progress="hidden")
    make_button.click(make_map, color_by, [emap, map_status])
    emap.submit(pick_on_map, [emap, size, *filters], [sel_ids, *outputs], show_progress="hidden")
    clear_button.click(lambda: None, None, sel_ids).then(
        to_first, [size, *filters], outputs, show_progress="hidden"
    )

    def refresh_all(
        current: str | None, page_now: float, size_now: float, *filter_values: Any
    ) -> tuple:
        controls = refresh(current)
        if version_or_none(service) is None:
            return (
                *controls,
                {"tiles": [], "selected": [], "classes": [], "key": ""},
                "No trained model yet.",
                gr.skip(),
                "",
            )
        return (*controls, *show(page_now, size_now, *filter_values))

    return Panel(
        refresh_all,
        outputs=[f_label, f_class, target, f_person, keys, *outputs],
        inputs=[target, page, size, *filters],
        handles={
            "cluster": f_cluster,
            "sort": f_sort,
            "page": page,
            "focus": focus,
            "similar": similar_button,
        },
        store_changes=[acted, relabelled, undone, *suspect_changes, *duplicate_changes],
    )


def _details_md(r: dict[str, Any]) -> str:
    """One stored image's row, in words."""
    top = " · ".join(
        f"{r[f'top{k}_class']} {r[f'top{k}_prob']:.1%}"
        for k in (1, 2, 3)
        if r.get(f"top{k}_class") is not None and r.get(f"top{k}_prob") is not None
    )
    why = " and ".join(reason_words(r["reason"])) if r["label"] == UNKNOWN else ""
    lines = [
        f"**#{r['id']}** · `{html.escape(r['source'])}`",
        f"Label **{r['label']}**" + (f" ({why})" if why else "") + f" · Top-3: {top}",
    ]
    more = []
    if r["neighbor_distance"] is not None:
        more.append(f"distance to training data {r['neighbor_distance']:.3f}")
    if r["cluster_id"] is not None:
        more.append("noise (no cluster)" if r["cluster_id"] < 0 else f"cluster {r['cluster_id']}")
    more.append(f"batch {r['batch_id']}")
    more.append(f"scored {r['scored_at']}")  # UTC text to the second, as browsing gives it
    if r["human_label"]:
        more.append(f"labelled **{r['human_label']}** by a person")
    more.append(f"SHA-256 `{r['sha256'][:12]}…`")
    return "  \n".join([*lines, " · ".join(more)])


def _days(text: str | None) -> tuple[dt.date | None, dt.date | None]:
    """``2026-12-04`` (one day) or ``2026-12-01..2026-12-04`` (either end may be left open)."""
    text = (text or "").strip()
    if not text:
        return None, None
    first, sep, last = (part.strip() for part in text.partition(".."))
    try:
        ends = [dt.date.fromisoformat(x) if x else None for x in (first, last if sep else first)]
    except ValueError:
        raise gr.Error(
            "a day is written 2026-12-04; a range 2026-12-01..2026-12-04", print_exception=False
        ) from None
    return ends[0], ends[1]


def _ints(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise gr.Error(f"{what} id must be a whole number, e.g. 3", print_exception=False) from None


def _relabel_words(result: Any) -> str:
    text = f"{result.labelled} image{'s' * (result.labelled != 1)} labelled {result.label}"
    if result.unchanged:
        text += f" ({result.unchanged} already were)"
    if result.missing:
        text += f"; {len(result.missing)} no longer available to copy"
    return text + f" · undo: Z or action {result.action_id}"


def _exclude_words(done: dict[str, Any]) -> str:
    parts = [f"{n} from cluster {cid}" for cid, n in done["clusters"].items()]
    text = "left out of promotion: " + ", ".join(parts)
    if done["not_in_cluster"]:
        text += f" ({done['not_in_cluster']} in no cluster, left as they are)"
    return text + " · undo: Z"


def _audit_md(service: Service) -> str:
    log = service.audit(limit=5)
    if not log["actions"]:
        return "No review actions yet."
    lines = [f"**Recent actions** ({log['total']:,} recorded)"]
    for a in log["actions"]:
        undone = " — *undone*" if a["undone_by"] else ""
        lines.append(f"- {a['at']} · {html.escape(a['who'])} · {html.escape(a['summary'])}{undone}")
    return "\n".join(lines)
