"""The Unknowns tab: UNKNOWN images clustered, each cluster named, trimmed, promoted or rejected."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import gradio as gr

from imagesieve._errors import UserError
from imagesieve.app._service import Service
from imagesieve.app.ui._review import SORT_WORDS
from imagesieve.app.ui._widgets import (
    Panel,
    app_user,
    class_names,
    gallery_value,
    pct,
    progress_relay,
    user_errors,
    version_or_none,
)
from imagesieve.classifier import UNKNOWN
from imagesieve.ingest import history_clustering_words

#: Most members a cluster's promotion is counted over (its confirmation says how many).
MAX_MEMBERS = 1_000_000
#: Clusters shown with their galleries (largest first); members shown per cluster.
MAX_CLUSTERS_SHOWN = 20
MEMBERS_SHOWN = 24


def _parse_ids(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[\s,;]+", text or "") if p]
    bad = [p for p in parts if not p.lstrip("#").isdigit()]
    if bad:
        raise UserError(f"not an image id: {bad[0]!r} (give ids like '12, 15')")
    return tuple(int(p.lstrip("#")) for p in parts)


def _shares(hist: dict[str, int]) -> dict[str, float]:
    total = sum(hist.values()) or 1
    return {k or "(none)": v / total for k, v in hist.items()}


def _unknowns_status(service: Service) -> str:
    version = version_or_none(service)
    if version is None:
        return "No trained model yet."
    alive = [c for c in service.clusters() if c["size"] > 0]
    by_status = Counter(c["status"] for c in alive)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(by_status.items()))
    unknown, noise = service.sql(
        f"SELECT count(*) FILTER (WHERE label = '{UNKNOWN}'), count(*) FILTER (WHERE cluster_id = -1) "
        f"FROM predictions WHERE model_version = {_quote(version.name)}",
        limit=1,
    ).rows[0]
    into = service.training_dir()
    where = f"`{into}`" if into else "the folder given below (the model's training folder is gone)"
    return (
        f"Model {version.name}: {unknown:,} UNKNOWN images; {len(alive)} clusters "
        f"({counts or 'none yet'}); {noise:,} left as noise. Promoting copies a cluster's "
        f"images into {where}."
    )


def _quote(text: str) -> str:
    """A SQL string literal (for values the app itself holds, like a version name)."""
    return "'" + text.replace("'", "''") + "'"


def unknowns_tab(service: Service, review: tuple[Any, dict[str, Any]] | None = None) -> Panel:
    """The tab; ``review`` (the app's Tabs, the Review tab's filters) lets a cluster open there."""

    def refresh() -> tuple:
        rows = service.clusters() if version_or_none(service) is not None else []
        return _unknowns_status(service), rows

    @user_errors
    def cluster(
        min_size: float,
        poor: bool,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands out its bar
    ) -> tuple:
        progress(0, desc="clustering")
        run = service.run_clustering(
            progress=progress_relay(progress, unit="steps"),
            min_cluster_size=int(min_size) or None,
            poor_quality=bool(poor),
        )
        notes = "; ".join(w for w in (run.continued_words(), run.left_out_words()) if w)
        left = f" ({notes})" if notes else ""
        if run.clusters:
            gr.Info(f"{len(run.clusters)} clusters among {run.images} UNKNOWN images{left}")
        else:
            gr.Warning(
                f"no clusters found among {run.images} UNKNOWN images{left} (all are noise): "
                "try a smaller cluster size"
            )
        return refresh()

    @user_errors
    def retrain(request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        progress(0, desc="training")
        version = service.retrain(
            progress=progress_relay(progress, unit="steps"), who=app_user(request)
        )
        accuracy = version.meta.get("metrics", {}).get("accuracy")
        clustered = history_clustering_words(service.history(version.name) or {})
        gr.Info(
            f"trained and activated {version.name}"
            + (f": test accuracy {accuracy:.3f}" if accuracy is not None else "")
            + (f"; {clustered}" if clustered else "")
        )
        return refresh()

    gr.Markdown(
        "UNKNOWN images grouped into clusters of look-alikes (HDBSCAN), largest first. Name a "
        "cluster, leave out members that do not belong, then promote it into the training data "
        "as a new class (or reject it), and retrain."
    )
    with gr.Row():
        min_size = gr.Slider(
            0,
            200,
            value=0,
            step=1,
            label="Smallest cluster (images; 0 adapts to the number of UNKNOWNs)",
            elem_id="unknowns-min-size",
        )
        poor = gr.Checkbox(
            value=False,
            label="Include photos of poor quality (left out: they are to be reshot)",
            elem_id="unknowns-poor",
        )
        run_button = gr.Button("Run clustering", variant="primary", elem_id="unknowns-run")
        retrain_button = gr.Button("Retrain on the training folder", elem_id="unknowns-retrain")
    status = gr.Markdown(elem_id="unknowns-status")
    with gr.Row():
        show = gr.Radio(
            ["open", "all", "promoted", "rejected"],
            value="open",
            label="Show clusters",
            elem_id="unknowns-show",
        )
        into = gr.Textbox(
            label="Promote into (blank: the active model's training folder)",
            elem_id="unknowns-into",
        )
    clusters = gr.State([])

    # One render at a time: Gradio's render iterates the session's blocks while another render
    # of them adds its own ("dictionary changed size during iteration", seen in CI). Gradio fires
    # a State's change twice (gradio#12346), so every page renders the panels twice: the panels
    # key their buttons and listeners, or a click between the two renders would reach nothing.
    @gr.render(
        inputs=[clusters, show],
        triggers=[clusters.change, show.change],
        concurrency_limit=1,
        concurrency_id="unknowns-panels",
    )
    def panels(rows: list[dict[str, Any]] | None, which: str) -> None:
        shown = [c for c in rows or [] if c["size"] > 0 and _listed(c, which)]
        if not shown:
            gr.Markdown("No clusters to show here. Run clustering after scoring some images.")
            return
        if len(shown) > MAX_CLUSTERS_SHOWN:
            gr.Markdown(f"Showing the {MAX_CLUSTERS_SHOWN} largest of {len(shown)} clusters.")
        for c in shown[:MAX_CLUSTERS_SHOWN]:
            _cluster_panel(service, c, clusters, into, review)

    run_button.click(cluster, [min_size, poor], [status, clusters], show_progress_on=[status])
    retrained = retrain_button.click(retrain, None, [status, clusters], show_progress_on=[status])
    # Any cluster action leaves a new list here: the header's counts follow it.
    listed = clusters.change(None, None, None, show_progress="hidden")
    return Panel(
        user_errors(refresh), [status, clusters], model_changes=[retrained], store_changes=[listed]
    )


def _listed(c: dict[str, Any], which: str) -> bool:
    """Whether the "Show clusters" choice ``which`` lists cluster ``c`` (``open``: the store's)."""
    if which == "open":
        return bool(c["open"])
    return which == "all" or c["status"] == which


def _cluster_panel(
    service: Service,
    c: dict[str, Any],
    clusters: gr.State,
    into: Any,
    review: tuple[Any, dict[str, Any]] | None = None,
) -> None:
    """One cluster: its members as a gallery, Top-1/Top-2 histograms and the review actions.

    With ``review``, a button opens all its members in the Review tab, least typical first.
    """
    cid = c["cluster_id"]

    def named(part: str) -> dict[str, str]:
        """A part's elem_id and key: the same key on every render keeps the ids a page holds."""
        name = f"cluster-{cid}-{part}"
        return {"elem_id": name, "key": name}

    # every member now (new UNKNOWNs join a cluster between runs); the gallery shows the first
    everyone = service.cluster_members(cid, limit=MAX_MEMBERS)
    taking = sum(not m["excluded"] for m in everyone)  # what a promotion copies
    members = everyone[:MEMBERS_SHOWN]
    captions = (
        f"#{m['id']} · {m['top1_class']} {pct(m['top1_prob'])}"
        + (" · left out" if m["excluded"] else "")
        for m in members
    )
    gallery = gallery_value(service, zip([m["id"] for m in members], captions, strict=True))
    title = f"Cluster {cid} · {c['size']} images · {c['status']}"
    if c["status"] == "promoted" and c.get("pending"):
        title += f" · {c['pending']} not promoted yet"
    if c.get("name"):
        title += f" · “{c['name']}”"
    notes = [f"medoid #{c['medoid_id']}"]
    if c.get("cohesion") is not None:
        notes.append(f"cohesion {c['cohesion']:.3f}")
    if c.get("excluded"):
        notes.append(f"{c['excluded']} left out of promotion")
    if c.get("promoted_into"):
        notes.append(f"promoted into `{c['promoted_into']}`")

    def done(message: str) -> list[dict[str, Any]]:
        gr.Info(message)
        return service.clusters()

    @user_errors
    def name_it(name: str | None, request: gr.Request) -> Any:
        row = service.update_cluster(cid, name=name or "", who=app_user(request))
        return done(f"cluster {cid} named “{row['name']}”")

    @user_errors
    def leave_out(ids: str | None, request: gr.Request) -> Any:
        chosen = _parse_ids(ids or "")
        if not chosen:
            raise gr.Error("give the ids to leave out, e.g. '12, 15'", print_exception=False)
        row = service.update_cluster(cid, exclude=chosen, who=app_user(request))
        return done(f"cluster {cid}: {row['excluded']} members left out of promotion")

    @user_errors
    def promote(name: str | None, folder: str | None, confirmed: bool, request: gr.Request) -> Any:
        name = (name or "").strip() or (c.get("name") or "")
        if not name:
            raise gr.Error("name the cluster (its new class) first", print_exception=False)
        if not confirmed:
            return gr.skip()
        result = service.promote_cluster(
            cid, name, (folder or "").strip() or None, who=app_user(request)
        )
        extra = f", {result.already_there} already there" if result.already_there else ""
        extra += f", {len(result.missing)} no longer available" if result.missing else ""
        return done(f"cluster {cid}: {result.copied} images copied into {result.dest}{extra}")

    @user_errors
    def reject(confirmed: bool, request: gr.Request) -> Any:
        if not confirmed:
            return gr.skip()
        service.update_cluster(cid, reject=True, who=app_user(request))
        return done(f"cluster {cid} rejected")

    with gr.Group(elem_id=f"cluster-{cid}", elem_classes=["imagesieve-cluster"]):
        gr.Markdown(f"### {title}\n{' · '.join(notes)}")
        with gr.Row():
            gr.Gallery(
                value=gallery,
                label=f"Members (first {MEMBERS_SHOWN})",
                columns=8,
                height=260,
                object_fit="contain",
                elem_id=f"cluster-{cid}-gallery",
                scale=3,
            )
            with gr.Column(scale=1):
                for n in (1, 2):
                    gr.Label(
                        value=_shares(c.get(f"top{n}") or {}),
                        label=f"Top-{n} class of members",
                        show_heading=False,
                        num_top_classes=5,
                    )
        with gr.Row():
            name_box = gr.Textbox(
                value=c.get("name") or "",
                label="Name: a new class, or an existing class to merge into",
                **named("name"),
            )
            ids_box = gr.Textbox(
                label="Leave out ids",
                placeholder="12, 15",
                **named("exclude"),
            )
        with gr.Row():
            name_button = gr.Button("Name", size="sm", **named("name-button"))
            leave_button = gr.Button(
                "Leave out",
                size="sm",
                **named("exclude-button"),
            )
            promote_button = gr.Button(
                "Promote into the training data",
                size="sm",
                variant="primary",
                **named("promote"),
            )
            reject_button = gr.Button(
                "Reject",
                size="sm",
                variant="stop",
                **named("reject"),
            )
    if review is not None and review[1]:
        tabs, handles = review
        review_button = gr.Button(
            f"Review all {len(everyone)} members (least typical first)",
            size="sm",
            **named("review"),
        )
        review_button.click(
            lambda: (gr.Tabs(selected="review"), str(cid), SORT_WORDS["outlier"], 1),
            None,
            [tabs, handles["cluster"], handles["sort"], handles["page"]],
            key=review_button.key,  # listeners are keyed apart from components
        )
    name_button.click(name_it, name_box, clusters, key=name_button.key)
    leave_button.click(leave_out, ids_box, clusters, key=leave_button.key)
    # Promote copies files and reject files the cluster away: both ask first, with the count.
    confirmed = gr.Checkbox(value=False, visible=False, **named("confirmed"))
    promote_button.click(
        promote,
        [name_box, into, confirmed],
        clusters,
        key=promote_button.key,
        js=f"""(name, into, c) => {{
            const n = (name || '').trim() || {json.dumps(c.get("name") or "")};
            const merge = {json.dumps(class_names(service))}.includes(n);
            return [name, into, !n || confirm((merge
                ? `Merge {taking} images of cluster {cid} into the existing class ${{n}}?`
                : `Promote {taking} images of cluster {cid} as ${{n}}?`)
              + ' They are copied into the training data (undo: the Review tab).')];
        }}""",
    )
    reject_button.click(
        reject,
        confirmed,
        clusters,
        key=reject_button.key,
        js=f"(c) => [confirm('Reject cluster {cid} ({c['size']} images): not a new kind?')]",
    )
