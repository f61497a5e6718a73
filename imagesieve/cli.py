"""The ``imagesieve`` command: a thin layer that parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from imagesieve import __version__
from imagesieve._errors import KINDS, UserError, classify_error
from imagesieve._workspace import Workspace
from imagesieve.classifier import CLASS_WEIGHTS, FLIPS, Progress, off_target_words, untested_words

__all__ = ["main"]

log = logging.getLogger(__name__)


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    """A progress(stage, done, total) callback drawing one tqdm bar per stage on stderr.

    A stage of total 1 is one step (training's phases): it shows its time, not a count or an
    image rate. A bar closes once its stage is done, so the next one takes its line.
    """
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not enabled:
            return
        bar = bars.get(stage)
        if bar is None:
            step = {"bar_format": "{desc}: {elapsed}"} if total == 1 else {"unit": "img"}
            bar = bars[stage] = tqdm(
                total=total or None, desc=stage, leave=False, file=sys.stderr, **step
            )
        bar.update(done - bar.n)
        if total and done >= total:
            bars.pop(stage).close()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _emit(args: argparse.Namespace, doc: dict[str, Any], human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        human()


def _print_metrics(m: dict[str, Any]) -> None:
    parts = [f"accuracy {m['accuracy']:.4f}", f"macro-F1 {m['macro_f1']:.4f}"]
    if m.get("roc_auc") is not None:
        parts.append(f"ROC-AUC {m['roc_auc']:.4f}")
    if m.get("ece") is not None:
        parts.append(f"ECE {m['ece']:.4f}")
    on = f"{m['evaluated_on']} " if m.get("evaluated_on") else ""
    print(f"  {', '.join(parts)} on {m['n']} {on}images")
    if m.get("unknown_rate") is not None:
        by = m.get("unknown_by_rule") or {}
        rules = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in by.items())
        print(f"  UNKNOWN {m['unknown_rate']:.1%} of them" + (f" ({rules})" if rules else ""))
    off = off_target_words(m.get("unknown_vs_target"))
    if off:
        print(f"  note: {off}")
    twins = m.get("near_training")
    if twins:
        without = twins["accuracy_without"]
        print(
            f"  note: {twins['images']} of them nearly duplicate a training image (leakage: the "
            "metrics overstate; metrics.json near_training lists them)"
            + ("" if without is None else f"; accuracy without them {without:.4f}")
        )


def cmd_train(args: argparse.Namespace, ws: Workspace) -> None:
    """The `train` verb: a new model version from an ImageFolder."""
    from imagesieve.classifier import TrainOptions, card_words, train_model
    from imagesieve.models import active_version

    given = {
        "backbone": args.backbone,
        "weights": args.weights,
        "finetune_epochs": args.finetune_epochs,
        "finetune_lr": args.finetune_lr,
        "patience": args.patience,
        "flips": args.flips,
        "test_size": args.test_size,
        "val_size": args.val_size,
        "class_weight": args.class_weight,
        "confidence_threshold": args.threshold,
        "false_unknown_rate": args.false_unknown_rate,
        "seed": args.seed,
    }
    given = {k: v for k, v in given.items() if v is not None}
    previous = active_version(ws)
    if args.quality:
        from imagesieve.classifier import merge_overrides

        base = TrainOptions.from_version(previous).quality
        try:
            given["quality"] = merge_overrides(base, _quality_args(args.quality))
        except ValueError as e:
            raise UserError(str(e)) from None
    opts = TrainOptions.from_version(previous, activate=not args.no_activate, **given)
    with _progress(not args.json) as progress:
        result = train_model(args.data_dir, ws, opts, progress)
    v = result.version
    history = None
    if not args.no_history and previous is not None:
        from imagesieve.store import StoreBusyError

        try:
            history = _score_history(ws, v.name, previous.name, not args.json)
        except StoreBusyError as e:
            print(
                f"  history: the server holding the store serves {v.name} {_serves_when(ws)} "
                f"and scores the images stored with {previous.name} in the background "
                "(`GET /api/v1/retrain` shows the progress)"
                if opts.activate
                else f"  history not scored: {e}; run `imagesieve score --history-of "
                f"{previous.name} --model {v.name}` when the store is free",
                file=sys.stderr,
            )
    doc = {
        "version": v.name,
        "path": str(v.path),
        "activated": opts.activate,
        "classes": v.classes,
        "metrics": result.metrics,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 1),
        "split": v.meta["split"],
        "thresholds": v.meta["thresholds"],
        "open_set": v.meta["open_set"],
        "label_check": v.meta.get("label_check"),
        "duplicates": v.meta.get("duplicates"),
        "training": v.meta["training"],
        "history": history,
    }

    def human() -> None:
        print(
            f"trained {v.name} ({v.meta['backbone']}, {len(v.classes)} classes, "
            f"{v.meta['data']['images']} images) in {result.seconds:.0f} s"
            + (" and activated it" if opts.activate else "")
        )
        _print_metrics(result.metrics)
        s = v.meta["split"]
        print(f"  split: {s['train']} train, {s['val']} val, {s['test']} test")
        untested = untested_words(s)
        if untested:
            print(f"  {untested}")
        th, card = v.meta["thresholds"], v.meta["open_set"]
        cal, real = th["calibration"], th["calibration"]["realised"]
        mix = f" + {th['mix']:.3g} x (1 - Top-1)" if th["mix"] else ""
        print(
            f"  UNKNOWN when Top-1 < {th['confidence']:.3g} or {v.distance_words}{mix} > "
            f"{th['distance']:.4f}: {real['unknown']:.1%} of {cal['n']} held-out known images "
            f"(target {cal['false_unknown_rate']:.0%}; poor photo {real.get('poor_quality', 0):.1%}, "
            f"low confidence {real['low_confidence']:.1%}, "
            f"far from training {real['far_from_training']:.1%}); other rates: "
            "`imagesieve thresholds --tradeoff`"
        )
        if card["mean_recall"] is not None:
            print(f"  open-set report card: {card_words(card)}")
        dups = v.meta.get("duplicates") or {}
        if dups.get("groups"):
            where = (
                "kept on one side of the split"
                if dups["kept_together"]
                else f"{dups['across_splits']} of them across your train/val/test folders: "
                "leakage, listed in meta.json"
            )
            print(
                f"  near-duplicates: {dups['groups']} groups of {dups['images']} training images, "
                + where
            )
        check = v.meta.get("label_check") or {}
        if check.get("found"):
            print(
                f"  label check: {check['found']} of {check['checked']} training images may be "
                f"mislabelled (`imagesieve suspects` lists them; likeliest first):"
            )
            for sus in check["suspects"][:5]:
                print(
                    f"    {sus['path']}: labelled {sus['given']}, looks like {sus['suggested']} "
                    f"({sus['suggested_confidence']:.0%})"
                )
        if result.skipped:
            print(
                f"  skipped {len(result.skipped)} unreadable files (listed in {v.path / 'meta.json'}):"
            )
            for item in result.skipped[:5]:
                print(f"    {item['path']}: {item['reason']}")
        print(f"  report: {v.report_dir}")
        if history is not None:
            _print_history(history)

    _emit(args, doc, human)


def _score_history(ws: Workspace, new: str, old: str, show: bool) -> dict[str, Any] | None:
    """Score ``old``'s stored images with ``new`` (after a retrain); None if nothing is stored.

    A store held by a running server raises ``StoreBusyError`` (not waited for).
    """
    from imagesieve.ingest import score_history
    from imagesieve.store import STORE_FILE, Store

    if not (ws.root / STORE_FILE).is_file():
        return None
    with Store(ws) as store, _progress(show) as progress:
        return score_history(ws, new, old, progress, store=store)


def _print_history(h: dict[str, Any]) -> None:
    """The before/after diff of a new version's scoring of the stored history."""
    from imagesieve.ingest import describe_history

    first, *rest = describe_history(h)
    print(f"  {first}")
    for line in rest:
        print(f"    {line}")


def cmd_evaluate(args: argparse.Namespace, ws: Workspace) -> None:
    """The `evaluate` verb: metrics and report files for a labelled folder."""
    from imagesieve.classifier import evaluate_model

    with _progress(not args.json) as progress:
        metrics, out_dir = evaluate_model(args.data_dir, ws, args.model, progress=progress)
    doc = {**metrics, "report_dir": str(out_dir)}

    def human() -> None:
        print(f"evaluated {metrics['model_version']} on {args.data_dir}")
        _print_metrics(metrics)
        for c, u in metrics.get("unseen_classes", {}).items():
            print(
                f"  class {c!r} is not known to the model: {u['unknown']}/{u['images']} marked UNKNOWN"
            )
        if metrics.get("failed"):
            print(f"  {len(metrics['failed'])} files could not be read (see metrics.json)")
        print(f"  report: {out_dir}")

    _emit(args, doc, human)


def _print_prediction(p: dict[str, Any]) -> None:
    """One line for a prediction in its JSON form (``Prediction.to_dict``)."""
    from imagesieve.classifier import UNKNOWN

    if p["error"] is not None:
        print(f"{p['source']}: FAILED ({p['error_kind']}): {p['error']}")
        return
    tops = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in p["top3"])
    flag = f"  [{UNKNOWN}: {p['reason']}]" if p["label"] == UNKNOWN else ""
    near = p["neighbor_distance"]
    dist = "" if near is None else f"  distance {near:.3f}"
    print(f"{p['source']}: {p['label']}{flag}  ({tops}){dist}")


def _score_imagenet(args: argparse.Namespace, ws: Workspace) -> None:
    """`score --imagenet`: the backbone's own ImageNet Top-3, not stored (no trained version)."""
    from imagesieve.classifier import Predictor, write_predictions_csv
    from imagesieve.ingest import expand_inputs, fetch_items
    from imagesieve.models.export import imagenet_version

    version = imagenet_version(ws, args.backbone)
    predictor = Predictor(version, threshold=args.threshold)
    items = (
        (i.name, i.error or i.source)
        for i in fetch_items(expand_inputs(args.inputs, column=args.column))
    )
    preds = []
    with _progress(not args.json) as progress:
        for batch in predictor.score_batches(items):
            preds += batch
            progress("scoring", len(preds), 0)
    if args.csv:
        write_predictions_csv(preds, args.csv)
    counts = Counter(p.label if p.ok else "failed" for p in preds)
    doc = {
        "model_version": version.name,
        "threshold": predictor.threshold,
        "counts": counts,
        "predictions": [p.to_dict() for p in preds],
    }

    def human() -> None:
        for p in [p for p in preds if p.ok][: args.show] + [p for p in preds if not p.ok]:
            _print_prediction(p.to_dict())
        print(
            f"scored {len(preds)} images with {version.name} (not stored): "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )

    _emit(args, doc, human)


def cmd_score(args: argparse.Namespace, ws: Workspace) -> int | None:
    """The `score` verb: images, folders, zips, lists and URLs into the store, with a report."""
    alone = "--history-of" if args.history_of else "--ray" if args.ray is not None else None
    if alone and _beside_server(ws) is not None:
        raise UserError(
            f"score {alone} does not run through the server holding this workspace's store: "
            "stop the server first (a server scores the history of each version it activates)"
        )
    if args.history_of:
        if args.inputs or args.retry_failed:
            raise UserError("--history-of scores stored images: give no inputs with it")
        from imagesieve.models import get_version

        new = get_version(ws, args.model).name
        history = _score_history(ws, new, args.history_of, not args.json)
        if history is None:
            raise UserError(f"nothing stored with {args.history_of}")
        _emit(args, history, lambda: _print_history(history))
        return None
    if not args.inputs and not args.retry_failed:
        raise UserError("nothing to score: give image files, folders, zips, CSV/XLSX lists or URLs")
    if args.imagenet:
        _score_imagenet(args, ws)
        return
    from imagesieve.ingest import (
        POOR_QUALITY_FOLDER,
        FetchOptions,
        RayOptions,
        ScoreOptions,
        drift_words,
        score_inputs,
    )

    if args.ray_shards and args.ray is None:
        raise UserError("--ray-shards goes with --ray")
    opts = ScoreOptions(
        model=args.model,
        threshold=args.threshold,
        distance_threshold=args.distance_threshold,
        column=args.column,
        rescore=args.rescore,
        retry_failed=args.retry_failed,
        csv=args.csv,
        sort_into=args.sort_into,
        keep_images=args.keep_images,
        fetch=FetchOptions(workers=args.fetch_workers, read_timeout=args.timeout),
        ray=None
        if args.ray is None
        else RayOptions(args.ray or None, args.ray_actors, shards=args.ray_shards),
    )
    server = _beside_server(ws) if opts.ray is None else None  # --ray: refused above
    with _progress(not args.json) as progress:
        if server is None:
            doc = score_inputs(ws, args.inputs, opts, progress).to_dict()
        else:
            absolute = {k: _absolute(getattr(opts, k)) for k in ("csv", "sort_into")}
            sent = {"inputs": [_absolute(i) for i in args.inputs]}
            sent["options"] = replace(opts, **absolute).to_dict()
            doc = server.call("score", sent, progress)
    code = score_exit_code(doc)
    doc["exit_code"] = code

    def human() -> None:
        done = [p for p in doc["predictions"] if p["error"] is None]
        for p in done[: args.show]:
            _print_prediction(p)
        more = doc["items"] - doc["failed"] - args.show
        if more > 0:
            print(f"... {more} more (use --csv OUT for all)")
        for f in doc["failures"][:50]:
            print(f"{f['source']}: FAILED ({f['kind']}): {f['message']}")
        if doc["failed"] > 50:
            print(f"... {doc['failed'] - 50} more failures (imagesieve sql: failures table)")
        if doc["ignored"]:
            print(
                f"ignored {len(doc['ignored'])} non-image files "
                f"(e.g. {doc['ignored'][0]['source']})"
            )
        labels = ", ".join(f"{k} {v}" for k, v in sorted(doc["labels"].items())) or "none"
        print(
            f"batch {doc['batch_id']} with {doc['model_version']}: {doc['items']} items, "
            f"{doc['scored']} newly scored, {doc['rescored']} rescored, "
            f"{doc['already_scored']} already stored, {doc['failed']} failed "
            f"({doc['seconds']:.1f} s)" + (" through the server holding the store" * bool(server))
        )
        print(f"  labels: {labels}")
        if doc["unknown_reasons"]:
            print(
                f"  {doc['unknown']} UNKNOWN: "
                + ", ".join(f"{k} {v}" for k, v in sorted(doc["unknown_reasons"].items()))
            )
        if doc["poor_quality"]:
            print(
                f"  {doc['poor_quality']} photos of poor quality (UNKNOWN: reshoot them): "
                + ", ".join(f"{k} {v}" for k, v in sorted(doc["quality_flags"].items()))
            )
        if doc["drift"] and doc["drift"].get("ks_d") is not None:
            print(f"  drift: {drift_words(doc['drift'])}")
        if doc["near_duplicates"]:
            print(
                f"  {doc['near_duplicates']} images nearly duplicate other stored images "
                "(imagesieve duplicates)"
            )
        if doc["csv"]:
            print(f"  report: {doc['csv']}")
        if doc["sort_into"]:
            where = f"{doc['sort_into']}/<label>/"
            if doc["poor_quality"]:
                where += f", poor photos in {doc['sort_into']}/{POOR_QUALITY_FOLDER}/"
            print(f"  sorted into: {where}")
        if code == EXIT_SOME_FAILED:
            print(f"  exit code {code}: some items failed (see above)")
        elif code == EXIT_NONE_SCORED:
            print(f"  exit code {code}: nothing was scored or already stored")

    _emit(args, doc, human)
    return code


def _beside_server(ws: Workspace) -> Any:
    """A client of the server holding this workspace's store (``_local``), or None when none runs.

    DuckDB lets no other process open the store meanwhile, so the CLI works through it.
    """
    from imagesieve._local import LocalClient, running_server

    record = running_server(ws.root)
    client = None if record is None else LocalClient(record)
    return client if client is not None and client.answers(ws.root, __version__) else None


def _serves_when(ws: Workspace) -> str:
    """When the server holding the store serves a version just made active, in words.

    "now" when it answers the CLI's ping, which makes it follow the active version; else
    "from its next request" (it follows before each).
    """
    return "now" if _beside_server(ws) is not None else "from its next request"


#: The verbs that work through a server holding the store (``_beside_server``).
THROUGH_SERVER = (
    "score",
    "sql",
    "similar",
    "cluster",
    "promote",
    "images",
    "relabel",
    "batches",
    "duplicates",
    "audit",
    "thresholds",
    "suspects",
    "map",
)


def _on_store(ws: Workspace, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(ws, *args, **kwargs)``: here, or by the server holding the store (its JSON form).

    ``fn`` is a library function taking ``store=`` that the server offers by name
    (``app._local_api._library``); dataclass arguments travel as dicts.
    """
    server = _beside_server(ws)
    if server is None:
        return fn(ws, *args, **kwargs)
    sent = [asdict(a) if is_dataclass(a) else a for a in args]
    return server.call("call", {"function": fn.__name__, "args": sent, "kwargs": kwargs})


def _busy_words(ws: Workspace, verb: str) -> str | None:
    """Why ``verb`` cannot run while a server holds the store, and what can; None: no server."""
    from imagesieve._local import running_server

    record = running_server(ws.root)
    if record is None:
        return None
    return (
        f"`imagesieve serve` (PID {record.pid}) holds the store of {ws.root}, and {verb} "
        f"does not run through it: use its app or REST API ({record.url}/api/v1/docs), or "
        f"stop it first ({', '.join(THROUGH_SERVER)} work through it)"
    )


def _absolute(path: str | None) -> str | None:
    """A path as the server holding the store reads it (its working folder is not ours); a URL."""
    return None if path is None or "://" in path else os.path.abspath(path)


#: ``score``'s exit codes beyond 0 (every item scored or already stored) and 2 (a user error).
EXIT_SOME_FAILED = 3
EXIT_NONE_SCORED = 4
#: Any verb stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def score_exit_code(summary: dict[str, Any]) -> int:
    """0 when every item was scored or already stored; 3 when some failed; 4 when none was.

    ``summary``: ``ScoreSummary.to_dict()``.
    """
    if summary["items"] - summary["failed"] <= 0:
        return EXIT_NONE_SCORED
    return EXIT_SOME_FAILED if summary["failed"] else 0


def cmd_reindex(args: argparse.Namespace, ws: Workspace) -> None:
    """The `reindex` verb: check every version's FAISS index against DuckDB, or rebuild it."""
    from imagesieve.store import Store

    with Store(ws, check=False) as store:
        checks = [  # verify: the index file itself too
            store.indexes.rebuild(v) if args.rebuild else store.indexes.check(v, verify=True)
            for v in store.versions()
        ]
    doc = {"workspace": str(ws.root), "indexes": [c.__dict__ for c in checks]}

    def human() -> None:
        if not checks:
            print(f"nothing stored in {ws.root} yet")
        for c in checks:
            print(
                f"{c.model_version}: {c.action} ({c.rows} rows, +{c.added} -{c.removed}, "
                f"{c.seconds:.2f} s)"
            )

    _emit(args, doc, human)


def cmd_sql(args: argparse.Namespace, ws: Workspace) -> None:
    """The `sql` verb: one read-only query over the store, as a table, CSV or JSON."""
    from imagesieve.store import VIEWS, SqlResult, open_readonly, run_sql

    fmt = "json" if args.json else args.format
    if args.views:
        if fmt == "json":
            print(json.dumps({"views": VIEWS}, indent=2))
        else:
            width = max(len(name) for name in VIEWS)
            for name, description in VIEWS.items():
                print(f"{name:<{width}}  {description}")
        return
    if not args.query:
        raise UserError("no query: give one SQL statement, '-' to read it from stdin, or --views")
    sql = sys.stdin.read() if args.query == "-" else args.query
    limit = args.limit if args.limit is not None else (1_000_000 if args.out else 1000)
    timeout = args.timeout if args.timeout > 0 else None
    server = _beside_server(ws)
    if server is None:
        with open_readonly(ws) as con:
            result = run_sql(con, sql, limit=limit or None, timeout=timeout)
    else:
        asked = {"sql": sql, "limit": limit or None, "timeout": timeout}
        result = SqlResult.from_dict(server.call("sql", asked))
    if result.truncated and limit and len(result.rows) >= limit:
        print(
            f"imagesieve sql: note: stopped at {limit} rows (--limit N for more)", file=sys.stderr
        )
    elif result.truncated:  # the server's answer is capped in bytes: its memory is shared
        print(
            f"imagesieve sql: note: stopped at {len(result.rows)} rows, as much as the server "
            "holding the store answers at once (page with LIMIT and OFFSET)",
            file=sys.stderr,
        )
    if args.out:
        result.to_csv(args.out)
        doc = {
            "out": args.out,
            "columns": result.columns,
            "row_count": len(result.rows),
            "truncated": result.truncated,
            "seconds": round(result.seconds, 4),
        }
        if fmt == "json":
            print(json.dumps(doc, indent=2))
        else:
            print(
                f"wrote {len(result.rows)} rows x {len(result.columns)} columns to {args.out} "
                f"({result.seconds:.2f} s)"
            )
    elif fmt == "json":
        print(json.dumps(result.to_dict(), indent=2))
    elif fmt == "csv":
        result.to_csv(sys.stdout)
    else:
        print(result.to_text())


def cmd_models(args: argparse.Namespace, ws: Workspace) -> None:
    """The `models` verb: list versions, optionally activate one."""
    from imagesieve.classifier import unknown_now
    from imagesieve.models import activate_version, active_version, list_backbones, list_versions

    busy = False
    if args.activate:
        from imagesieve.search import activate_model
        from imagesieve.store import StoreBusyError

        try:
            activate_model(ws, args.activate)
        except StoreBusyError:  # a server holds the store: it follows and records it
            activate_version(ws, args.activate)
            busy = _serves_when(ws)
    active = active_version(ws)
    versions = list_versions(ws)
    rows = [
        {
            "version": v.name,
            "active": active is not None and v.name == active.name,
            "kind": v.meta.get("kind"),
            "backbone": v.meta.get("backbone"),
            "classes": len(v.classes),
            "created_at": v.meta.get("created_at"),
            "metrics": v.meta.get("metrics", {}),
            **unknown_now(v),
        }
        for v in versions
    ]
    doc = {
        "workspace": str(ws.root),
        "active": active.name if active else None,
        "versions": rows,
        "backbones": list_backbones(),
    }

    def human() -> None:
        if args.activate:
            print(
                f"activated {args.activate}"
                + (f": the server on this workspace serves it {busy}" if busy else "")
            )
        if not rows:
            print(f"no model versions in {ws.root}; run 'imagesieve train DATA_DIR'")
        for r in rows:
            acc = r["metrics"].get("accuracy")
            acc_s = f"accuracy {acc:.4f}" if acc is not None else ""
            if r["unknown_rate"] is not None:
                tuned = ", thresholds tuned" if r["thresholds_tuned"] else ""
                acc_s += f"  test UNKNOWN {r['unknown_rate']:.1%}{tuned}"
            print(
                f"{'*' if r['active'] else ' '} {r['version']:<28} {r['kind']:<9} {r['backbone']:<20} "
                f"{r['classes']:>4} classes  {r['created_at'] or ''}  {acc_s}"
            )

    _emit(args, doc, human)


def cmd_demo(args: argparse.Namespace, ws: Workspace) -> None:
    """The `demo` verb: ELPV mono cells -> train -> evaluate -> score a mixed batch -> serve."""
    from imagesieve._demo import run_demo

    with _progress(not args.json) as progress:
        doc = run_demo(ws, progress=progress, finetune_epochs=args.finetune_epochs)
    _emit(args, doc, lambda: print(doc["summary"]))
    if args.serve:
        cmd_serve(args, ws)


def cmd_serve(args: argparse.Namespace, ws: Workspace) -> None:
    """The `serve` verb: the Gradio app and the REST API until Ctrl-C."""
    from imagesieve._access import tokens_from_env
    from imagesieve.app import Limits, Service, parse_tokens, serve

    # A bad token file: said before the store opens.
    tokens = parse_tokens(args.token or (), args.token_file) or tokens_from_env()
    limits = Limits(
        max_file_bytes=args.max_upload_mb * 2**20,
        allow_fetch=tuple(args.allow_fetch or ()),
        allow_paths=tuple(os.path.abspath(p) for p in args.allow_paths or ()),
    )
    out = sys.stderr if args.json else sys.stdout

    def ready(url: str) -> None:
        print(
            f"serving {ws.root} on {url}  (API: {url}/api/v1/docs; the CLI works through it; "
            "Ctrl-C to stop)",
            file=out,
        )
        out.flush()

    with Service(ws, limits=limits) as service:
        serve(
            service,
            args.host,
            args.port,
            auth=args.auth,
            token=tokens,
            ui=args.ui,
            on_ready=ready,
        )


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=7860, help="port (default 7860; 0: any free one)"
    )
    parser.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="login for the app (default $IMAGESIEVE_AUTH; required beyond loopback)",
    )
    parser.add_argument(
        "--token",
        action="append",
        metavar="[NAME=]SECRET",
        help="bearer token for the API, repeatable; a NAME is who the audit log records "
        "(default $IMAGESIEVE_API_TOKEN; required beyond loopback)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="API tokens, one NAME=SECRET per line (kept out of the process list; "
        "default $IMAGESIEVE_API_TOKEN_FILE)",
    )
    parser.add_argument(
        "--max-upload-mb", type=int, default=50, help="largest file accepted per upload (MB)"
    )
    parser.add_argument(
        "--no-ui", dest="ui", action="store_false", help="the REST API alone, without the app"
    )
    parser.add_argument(
        "--allow-fetch",
        nargs="+",
        metavar="CIDR",
        help="networks that URL lists sent to the server may reach besides the public internet "
        "(default none: loopback, private and link-local addresses are refused)",
    )
    parser.add_argument(
        "--allow-paths",
        nargs="+",
        metavar="DIR",
        help="folders whose files URL lists sent to the server may name (default none)",
    )


def cmd_similar(args: argparse.Namespace, ws: Workspace) -> None:
    """The `similar` verb: nearest stored images to an image, a stored id or a class."""
    from imagesieve.search import find_similar, similar_answer

    query = {
        "image": args.image,
        "id": args.id,
        "class_name": args.class_name,
        "k": args.k,
        "max_distance": args.max_distance,
        "where": args.where,
        "model": args.model,
    }
    server = _beside_server(ws)
    if server is None:
        doc = similar_answer(*find_similar(ws, **query))
    else:
        query["image"] = _absolute(args.image)
        doc = server.call("similar", query)
    info = SimpleNamespace(**doc["query"])
    results = [SimpleNamespace(**r) for r in doc["results"]]

    def human() -> None:
        filt = f", {info.matching_rows} rows pass the filter" if info.where else ""
        print(
            f"{len(results)} nearest to {info.kind} {info.value} in {info.model_version} "
            f"({info.method}{filt})"
        )
        for r in results:
            label = f"{r.label} ({r.reason})" if r.reason else r.label
            cluster = "" if r.cluster_id is None else f"  cluster {r.cluster_id}"
            print(f"  {r.distance:.4f}  #{r.id:<7} {label:<32} {r.source}{cluster}")

    _emit(args, doc, human)


def _print_clusters(clusters: list[dict[str, Any]]) -> None:
    for c in clusters:
        if c["size"] == 0:
            continue
        looks = ", ".join(f"{k} {v}" for k, v in list(c["top1"].items())[:2])
        second = ", ".join(f"{k} {v}" for k, v in list(c["top2"].items())[:2])
        name = f" '{c['name']}'" if c["name"] else ""
        pending = c.get("pending") if c["status"] == "promoted" else 0
        waiting = f" ({pending} not promoted yet)" if pending else ""
        print(
            f"  cluster {c['cluster_id']:<4} {c['status']:<9}{name} {c['size']:>5} images"
            f"{waiting}, cohesion {c['cohesion']:.3f}; Top-1: {looks}; Top-2: {second}"
        )


def cmd_cluster(args: argparse.Namespace, ws: Workspace) -> None:
    """The `cluster` verb: cluster the UNKNOWNs, or list / name / reject / trim clusters."""
    from imagesieve.search import (
        ClusterParams,
        ClusterRun,
        list_clusters,
        run_clustering,
        update_cluster,
    )

    server = _beside_server(ws)
    if args.name or args.reject is not None or args.exclude:
        target = (
            int(args.name[0])
            if args.name
            else args.reject
            if args.reject is not None
            else int(args.exclude[0])
        )
        change = {
            "cluster_id": target,
            "name": args.name[1] if args.name else None,
            "reject": args.reject is not None,
            "exclude": tuple(int(i) for i in args.exclude[1:]) if args.exclude else (),
        }
        if server is None:
            row = update_cluster(ws, model=args.model, **change)
        else:
            row = server.call("cluster", {"model": args.model, "change": change})
        _emit(args, row, lambda: _print_clusters([row]))
        return
    if args.list:
        if server is None:
            rows = list_clusters(ws, model=args.model)
        else:
            rows = server.call("cluster", {"list": True, "model": args.model})
        _emit(
            args,
            {"clusters": rows},
            lambda: _print_clusters(rows) if rows else print("no clusters yet"),
        )
        return
    params = ClusterParams(
        min_cluster_size=args.min_cluster_size,
        min_samples=args.min_samples,
        pca_dims=args.pca_dims,
        umap_dims=args.umap_dims or None,
        allow_single_cluster=args.single_cluster,
        poor_quality=args.poor_quality,
    )
    with _progress(not args.json) as progress:
        if server is None:
            run = run_clustering(
                ws, params, model=args.model, export=args.export, progress=progress
            )
        else:
            export = _absolute(args.export)
            asked = {"model": args.model, "export": export, "params": asdict(params)}
            run = ClusterRun(**server.call("cluster", asked, progress))
    doc = run.to_dict()

    def human() -> None:
        print(
            f"clustered {run.images} UNKNOWN images of {run.model_version}: "
            f"{len(run.clusters)} cluster{'s' * (len(run.clusters) != 1)}, {run.noise} noise "
            f"({sum(run.seconds.values()):.1f} s); folders and summary.csv in {run.export_dir}"
        )
        continued = run.continued_words()
        if continued:
            print(f"  {continued}")
        if run.left_out.get("poor_quality"):
            print(f"  {run.left_out_words()}; --poor-quality clusters the photos too")
        elif run.left_out_words():
            print(f"  {run.left_out_words()}")
        _print_clusters(run.clusters)

    _emit(args, doc, human)


def cmd_promote(args: argparse.Namespace, ws: Workspace) -> None:
    """The `promote` verb: a cluster's images into the training data as a (new) class."""
    from imagesieve.search import PromoteResult, promote_cluster

    excluded = tuple(int(i) for i in args.exclude.split(",")) if args.exclude else ()
    server = _beside_server(ws)
    if server is None:
        result = promote_cluster(
            ws, args.cluster, args.name, args.into, exclude=excluded, model=args.model
        )
    else:
        into = _absolute(args.into)
        asked = {"cluster_id": args.cluster, "name": args.name, "into": into}
        asked |= {"exclude": list(excluded), "model": args.model}
        result = PromoteResult(**server.call("promote", asked))
    doc = result.to_dict()

    def human() -> None:
        print(
            f"promoted cluster {result.cluster_id} as '{result.name}': {result.copied} images copied "
            f"into {result.dest} ({result.already_there} already there, {result.excluded} excluded, "
            f"{len(result.missing)} no longer available"
            + (f", {result.set_aside} near-duplicates set aside" if result.set_aside else "")
            + ")"
        )
        _print_near_training(result.near_training)
        print(f"  next: imagesieve train {result.into}")

    _emit(args, doc, human)


def cmd_images(args: argparse.Namespace, ws: Workspace) -> None:
    """The `images` verb: page through the stored images by filters and sort."""
    from imagesieve.search import browse_images
    from imagesieve.store import ImageQuery

    query = ImageQuery(
        labels=args.label,
        reasons=args.reason,
        top1_classes=args.top1_class,
        human_labels=args.human_label,
        quality=args.quality,
        duplicates=args.duplicates,
        min_confidence=args.min_confidence,
        max_confidence=args.max_confidence,
        min_distance=args.min_distance,
        max_distance=args.max_distance,
        batch_ids=args.batch,
        cluster_ids=args.cluster,
        day_from=args.day_from,
        day_to=args.day_to,
        sort=args.sort,
    )
    page = _on_store(
        ws,
        browse_images,
        query,
        limit=args.limit,
        offset=args.offset,
        facets=args.json,
        model=args.model,
    )

    def human() -> None:
        rows = page["rows"]
        if not rows:
            print("no stored images match")
            return
        for r in rows:
            reason = f" ({r['reason']})" if r["reason"] else ""
            person = f"  labelled {r['human_label']}" if r["human_label"] else ""
            distance = "-" if r["neighbor_distance"] is None else f"{r['neighbor_distance']:.3f}"
            cluster = "-" if r["cluster_id"] is None else r["cluster_id"]
            print(
                f"{r['id']:>8}  {r['label']}{reason}  {r['top1_class']} {r['top1_prob']:.2f}  "
                f"distance {distance}  cluster {cluster}{person}  {r['source']}"
            )
        first = page["offset"] + 1
        print(f"images {first}-{first + len(rows) - 1} of {page['total']:,}")

    _emit(args, page, human)


def cmd_map(args: argparse.Namespace, ws: Workspace) -> None:
    """The `map` verb: project the stored embeddings to 2-D (cached), optionally as a CSV."""
    import csv

    from imagesieve.search import compute_map, map_points

    server = _beside_server(ws)
    with _progress(not args.json) as progress:
        if server is None:
            compute_map(ws, model=args.model, max_points=args.max_points, progress=progress)
            doc = map_points(ws, color_by=args.color_by, model=args.model)
        else:
            asked = {"model": args.model, "max_points": args.max_points, "color_by": args.color_by}
            doc = server.call("map", asked, progress)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "x", "y", args.color_by])
            names = [name for name, _, _ in doc["legend"]]
            for i, x, y, c in zip(doc["ids"], doc["x"], doc["y"], doc["c"], strict=True):
                w.writerow([i, x, y, names[c]])
    summary = {k: v for k, v in doc.items() if k not in ("ids", "x", "y", "c")}

    def human() -> None:
        print(
            f"map of {doc['version']}: {doc['points']:,} of {doc['stored_when_made']:,} stored "
            f"images in {doc['seconds']:.1f} s" + (f"; written to {args.out}" if args.out else "")
        )
        for name, _, n in doc["legend"][:10]:
            print(f"  {n:>7,}  {name}")

    _emit(args, summary, human)


def cmd_batches(args: argparse.Namespace, ws: Workspace) -> None:
    """The `batches` verb: past scoring batches; one with its failures; its CSV report."""
    from imagesieve.ingest import (
        batch_detail,
        drift_history,
        drift_words,
        list_batches,
        write_batch_report,
    )

    outs = {fmt: path for fmt in ("csv", "xlsx") if (path := getattr(args, fmt))}
    if outs and args.id is None:
        raise UserError(f"--{next(iter(outs))} writes one batch's report: give its --id")
    if args.id is not None:
        doc = _on_store(ws, batch_detail, args.id)
        server = _beside_server(ws)
        for fmt, path in outs.items():
            if server is None:
                with open(path, "wb") as f:
                    write_batch_report(ws, args.id, f, fmt=fmt)
            else:  # the server writes it where the CLI would
                where = [args.id, _absolute(path), fmt]
                server.call("call", {"function": "write_batch_report_file", "args": where})

        def one() -> None:
            print(
                f"batch {doc['batch_id']} ({doc['status']}) with {doc['model_version']}, "
                f"started {doc['started_at']}: {doc['items']} items, {doc['scored']} scored, "
                f"{doc['failed']} failed, {doc['unknown']} UNKNOWN"
            )
            if doc["drift"] and doc["drift"]["ks_d"] is not None:
                print(f"  drift: {drift_words(doc['drift'])}")
            for f in doc["failures"][:50]:
                print(f"  {f['source']}: {f['kind']}: {f['message']}")
            for path in outs.values():
                print(f"  report: {path}")

        _emit(args, doc, one)
        return
    if args.drift:
        rows = _on_store(ws, drift_history, args.drift, limit=args.limit)
        key = "batch_id" if args.drift == "batch" else "day"

        def drifts() -> None:
            if not rows:
                print("nothing to test yet (a version trained before drift has no reference)")
            for r in rows:
                words = drift_words(r) if r["ks_d"] is not None else "no distances"
                print(
                    f"{r[key]!s:>10}  {r['model_version']:<6} {r['images']:>7} images  drift: {words}"
                )

        _emit(args, {"drift": rows}, drifts)
        return
    doc = _on_store(ws, list_batches, limit=args.limit)

    def human() -> None:
        if not doc["batches"]:
            print("no batches yet")
        for b in doc["batches"]:
            rate = "" if b["unknown_rate"] is None else f" ({b['unknown_rate']:.1%})"
            print(
                f"{b['batch_id']:>6}  {b['started_at']}  {b['status']:<11} {b['model_version']:<6} "
                f"{b['items']:>7} items {b['failed']:>5} failed {b['unknown']:>6} UNKNOWN{rate}"
            )

    _emit(args, doc, human)


def cmd_suspects(args: argparse.Namespace, ws: Workspace) -> None:
    """The `suspects` verb: training images whose label looks wrong; move or remove them."""
    from imagesieve.search import fix_training_labels, label_suspects

    if args.relabel or args.remove:
        label, paths = (args.relabel[0], args.relabel[1:]) if args.relabel else (None, args.remove)
        if not paths:
            raise UserError("--relabel CLASS PATH...: give the images to move")
        doc = _on_store(
            ws,
            fix_training_labels,
            [str(Path(p).resolve()) for p in paths],
            label,
            model=args.model,
        )

        def moved() -> None:
            where = f"into {doc['label']}" if doc["label"] else "out of the training data"
            print(f"moved {doc['moved']} images {where} (action {doc['action_id']}; audit --undo)")

        _emit(args, doc, moved)
        return
    doc = label_suspects(ws, model=args.model)

    def human() -> None:
        print(
            f"{doc['version']}: {len(doc['suspects'])} training images of {doc['checked']} may be "
            f"mislabelled, likeliest first ({doc['method']})"
        )
        for sus in doc["suspects"][: args.limit]:
            print(
                f"  {sus['path']}: labelled {sus['given']} ({sus['self_confidence']:.0%}), "
                f"looks like {sus['suggested']} ({sus['suggested_confidence']:.0%})"
            )

    _emit(args, doc, human)


def cmd_relabel(args: argparse.Namespace, ws: Workspace) -> None:
    """The `relabel` verb: give stored images a class; they join its training data."""
    from imagesieve.search import RelabelResult, relabel_images

    ids = _id_list(args.ids)
    into = _absolute(args.into)
    result = _on_store(ws, relabel_images, ids, args.label, into=into, model=args.model)
    result = RelabelResult(**result) if isinstance(result, dict) else result  # the server's
    doc = result.to_dict()

    def human() -> None:
        print(
            f"action {result.action_id}: {result.labelled} images labelled {result.label} "
            f"({result.unchanged} already were); {result.copied} copied into {result.dest}, "
            f"{result.already_there} already there, {result.moved} moved from another class, "
            f"{len(result.missing)} no longer available"
        )
        _print_near_training(result.near_training, result.label)
        print(f"  undo: imagesieve audit --undo {result.action_id}")

    _emit(args, doc, human)


def _print_near_training(near: list[dict[str, Any]], label: str | None = None) -> None:
    """Warn of images that nearly duplicate a training image (a relabel: labelled otherwise)."""
    if not near:
        return
    other = [n for n in near if label is not None and n["training_label"] != label]
    print(
        f"  {len(near)} of them nearly duplicate a training image"
        + (f", {len(other)} of one labelled otherwise" if other else "")
        + ":"
    )
    for n in (other or near)[:5]:
        print(
            f"    {n['id']} {n['source']} ~ {n['training_source']} ({n['training_label']}, "
            f"distance {n['distance']:.4f})"
        )


def cmd_duplicates(args: argparse.Namespace, ws: Workspace) -> None:
    """The `duplicates` verb: groups of near-duplicate stored images; keep one of a group."""
    from imagesieve.search import keep_one, list_duplicates

    if args.keep is not None:
        doc = _on_store(ws, keep_one, args.keep, model=args.model)
        _emit(
            args,
            doc,
            lambda: print(
                f"kept image {doc['kept']}, set {doc['set_aside']} near-duplicates aside (not "
                f"clustered or promoted; action {doc['action_id']}; audit --undo)"
            ),
        )
        return
    doc = _on_store(ws, list_duplicates, model=args.model, limit=args.limit, offset=args.offset)

    def human() -> None:
        near, exact = doc["near"], doc["exact"]
        print(
            f"{doc['model_version']}: {near['total']} groups of near-duplicate images, "
            f"{exact['total']} contents that arrived under several names"
        )
        for g in near["groups"]:
            kept = f", kept {g['kept']}" if g["kept"] else ""
            print(f"  group {g['group_id']} ({g['size']} images{kept}):")
            for m in g["members"][:10]:
                aside = " (set aside)" if m["duplicate_of"] else ""
                print(f"    {m['id']:>8}  {m['label']:<16} {m['source']}{aside}")
            if g["size"] > 10:
                print(f"    ... {g['size'] - 10} more")
        for e in exact["groups"]:
            print(f"  same content {e['sha256'][:12]}: " + ", ".join(e["sources"][:5]))
        if near["groups"]:
            print("  keep one of a group: imagesieve duplicates --keep ID")

    _emit(args, doc, human)


def _id_list(text: str) -> list[int]:
    try:
        return [int(i) for i in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"ids must be whole numbers separated by commas: {text!r}") from None


def cmd_audit(args: argparse.Namespace, ws: Workspace) -> None:
    """The `audit` verb: the recorded review actions; --undo one."""
    from imagesieve.search import audit_log, undo_action

    if args.undo is not None:
        entry = _on_store(ws, undo_action, args.undo or None)
        _emit(args, entry, lambda: print(f"action {entry['action_id']}: {entry['summary']}"))
        return
    doc = _on_store(ws, audit_log, limit=args.limit)

    def human() -> None:
        if not doc["actions"]:
            print("no review actions recorded yet")
        for a in doc["actions"]:
            undone = f"  (undone by {a['undone_by']})" if a["undone_by"] else ""
            print(f"{a['action_id']:>5}  {a['at']}  {a['who']:<20} {a['summary']}{undone}")
        if doc["total"] > len(doc["actions"]):
            print(f"... {doc['total'] - len(doc['actions'])} older (--limit)")

    _emit(args, doc, human)


def cmd_thresholds(args: argparse.Namespace, ws: Workspace) -> None:
    """The `thresholds` verb: a version's UNKNOWN thresholds and counts; --preview or --set.

    ``--target`` / ``--set-target``: the thresholds calibration gives for another
    false-UNKNOWN rate, previewed or applied.
    """
    from imagesieve.classifier import bound_text, card_words, held_out_words
    from imagesieve.models import get_version
    from imagesieve.search import apply_thresholds, threshold_counts, thresholds_for_target

    if args.tradeoff:
        _thresholds_tradeoff(args, ws)
        return
    version = get_version(ws, args.model)
    confidence, distance = version.confidence_threshold, version.distance_threshold
    given = args.set or args.preview
    if given:
        confidence = _float_arg(given[0], "confidence")
        distance = None if given[1].lower() == "off" else _float_arg(given[1], "distance")
    given_rate = args.target if args.target is not None else args.set_target
    calibrated, target = None, None
    if given_rate is not None:
        calibrated = thresholds_for_target(ws, _rate_arg(given_rate), model=args.model)
        confidence, distance = calibrated["confidence"], calibrated["distance"]
        target = calibrated["target"]
    previewing = bool(args.preview) or args.target is not None
    quality = _quality_args(args.quality) if args.quality else None  # checked by the library
    applying = bool(args.set) or args.set_target is not None
    applying = applying or (quality is not None and not previewing)
    if applying:
        _on_store(
            ws,
            apply_thresholds,
            confidence,
            distance,
            quality=quality,
            model=args.model,
            target=target,
        )
        doc = _on_store(ws, threshold_counts, model=args.model)
    elif previewing:
        doc = _on_store(
            ws,
            threshold_counts,
            confidence,
            distance,
            quality=quality,
            keep=False,
            model=args.model,
            target=target,
        )
    else:
        doc = _on_store(ws, threshold_counts, model=args.model)
    if calibrated is not None:
        doc["calibrated"] = calibrated

    def human() -> None:
        c = doc["counts"]
        if calibrated is not None:
            real = calibrated["calibration"]["realised"]
            print(
                f"calibrated for {calibrated['target']:.1%} false UNKNOWN: realised "
                f"{real['unknown']:.1%} of {calibrated['calibration']['n']} held-out known images"
            )
        far = (
            " (distance rule off)"
            if doc["distance"] is None
            else f" or distance above {doc['distance']:.4g}"
        )
        verb = "would mark" if previewing else "mark"
        print(
            f"{doc['version']}: confidence below {doc['confidence']:.4g}{far}"
            f"{' (tuned)' * doc['tuned']}{' (applied)' * applying}"
        )
        print(
            f"  {verb} {c['unknown']:,} of {c['stored']:,} stored images UNKNOWN "
            f"({c['poor_quality']:,} poor photo{'s' * (c['poor_quality'] != 1)}, "
            f"{c['low_confidence']:,} by confidence, {c['far_from_training']:,} by distance)"
        )
        if c["held_out"]:
            print(f"  {verb} {held_out_words(c['held_out'])}")
        if c["report_card"]:
            print(f"  report card: {card_words(c['report_card'])}")
        if doc["quality"]:
            bounds = ", ".join(
                f"{k} {bound_text(v)}" + (" (set)" if k in doc["quality_overrides"] else "")
                for k, v in doc["quality"].items()
            )
            print(f"  photo quality bounds: {bounds}")

    _emit(args, doc, human)


def _quality_args(given: list[str]) -> dict[str, Any]:
    """``--quality KEY=VALUE`` arguments as bounds (VALUE: a number, off, or auto)."""
    from imagesieve.classifier import parse_bounds

    try:
        return parse_bounds(given)
    except ValueError as e:
        raise UserError(str(e)) from None


def _thresholds_tradeoff(args: argparse.Namespace, ws: Workspace) -> None:
    """`thresholds --tradeoff`: per false-UNKNOWN rate, what it costs and catches."""
    from imagesieve.search import threshold_tradeoff

    doc = threshold_tradeoff(ws, model=args.model)

    def human() -> None:
        print(
            f"{doc['version']}: per false-UNKNOWN rate, the thresholds calibration gives, the "
            "held-out test images (known classes) they flag, and a never-seen type's share flagged"
        )
        print(
            f"  {'rate':>6} {'confidence':>10} {'distance':>9} {'test':>6} {'new type':>8}  worst"
        )
        for r in doc["rates"]:
            dist = "off" if r["distance"] is None else f"{r['distance']:.4g}"
            test = "-" if r["test_unknown_rate"] is None else f"{r['test_unknown_rate']:.1%}"
            new = "-" if r["new_type_recall"] is None else f"{r['new_type_recall']:.0%}"
            w = r["worst_new_type"]
            worst = "-" if w is None else f"{w['class']} {w['recall']:.0%}"
            print(
                f"  {r['target']:>6.1%} {r['confidence']:>10.4g} {dist:>9} {test:>6} {new:>8}  "
                f"{worst}"
            )
        print("  apply one: imagesieve thresholds --set-target RATE")

    _emit(args, doc, human)


def _rate_arg(text: str) -> float:
    """A false-UNKNOWN rate as a share (0.03) or a percentage (3%)."""
    share = _float_arg(text.strip().removesuffix("%"), "the target rate")
    return share / 100 if text.strip().endswith("%") else share


def _float_arg(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{what} must be a number, got {text!r}") from None


def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    from imagesieve.models import DEFAULT_BACKBONE
    from imagesieve.store import SORTS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace", help="workspace directory (default: $IMAGESIEVE_WORKSPACE or ./sieve)"
    )
    common.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a summary"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")

    p = argparse.ArgumentParser(
        prog="imagesieve",
        description="Sort images with a trained classifier, flag those unlike anything it was "
        "trained on (UNKNOWN), group and review them into the training data, and query every "
        "scored image in SQL. New here? Run `imagesieve demo`.",
        epilog="`imagesieve VERB --help` lists a verb's options. Exit codes: 0 done; 2 an error, "
        f"said in one line on stderr; {EXIT_SOME_FAILED} `score`: some items failed (each "
        f"reason is stored); {EXIT_NONE_SCORED} `score`: nothing scored; {EXIT_INTERRUPTED} "
        "interrupted (Ctrl-C); 1 a bug (after its traceback).",
    )
    p.add_argument("--version", action="version", version=f"imagesieve {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser(
        "train",
        parents=[common],
        help="train a new model version on an ImageFolder",
        description="Train a new model version. Options not given are the active version's "
        "(its training options and confidence threshold), else the defaults shown.",
    )
    t.add_argument(
        "data_dir", metavar="DATA_DIR", help="one sub-folder per class, or train/ val/ test/"
    )
    t.add_argument("--backbone", help=f"backbone name (default {DEFAULT_BACKBONE})")
    t.add_argument("--weights", help="local ImageNet weights file for the backbone")
    t.add_argument(
        "--finetune-epochs",
        type=int,
        help="phase-2 epochs fine-tuning the backbone's last stages (default 0)",
    )
    t.add_argument(
        "--finetune-lr",
        type=float,
        help="phase-2 learning rate of the last stage (head: 10x)",
    )
    t.add_argument(
        "--patience",
        type=int,
        help="phase-2 epochs without a better validation accuracy before stopping (default 3)",
    )
    t.add_argument(
        "--flips",
        choices=FLIPS,
        help="phase-2 flips: horizontal (default); all flips and quarter turns for images "
        "with no up or down (cells, tiles, micrographs); none for text, digits and dials",
    )
    t.add_argument("--test-size", type=float, help="share of each class held out for test")
    t.add_argument(
        "--val-size",
        type=float,
        help="share of each large class held out for validation",
    )
    t.add_argument(
        "--class-weight",
        choices=CLASS_WEIGHTS,
        help="loss weighting against class imbalance (default sqrt inverse frequency)",
    )
    t.add_argument("--threshold", type=float, help="Top-1 probability below which -> UNKNOWN")
    t.add_argument(
        "--false-unknown-rate",
        type=float,
        help="share of held-out known images the UNKNOWN decision may flag (default 0.05)",
    )
    t.add_argument("--seed", type=int)
    t.add_argument(
        "--quality",
        action="append",
        metavar="KEY=VALUE",
        help="photo quality bound over the calibrated one, e.g. blur_max=0.8 (off; auto); "
        "repeatable",
    )
    t.add_argument("--no-activate", action="store_true", help="keep the current active version")
    t.add_argument(
        "--no-history",
        action="store_true",
        help="do not score the previous version's stored images with the new one",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate", parents=[common], help="metrics and report files on a labelled folder"
    )
    e.add_argument("data_dir", metavar="DATA_DIR")
    e.add_argument("--model", help="model version (default: the active one)")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser(
        "score",
        parents=[common],
        help="score images into the store: Top-3, UNKNOWN decision, report, sorted copies",
    )
    s.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image files, folders (recursive), .zip archives, .csv/.xlsx lists of URLs or paths, URLs",
    )
    s.add_argument("--model", help="model version (default: the active one)")
    s.add_argument("--column", help="the URL or path column of .csv/.xlsx lists (default: auto)")
    s.add_argument("--threshold", type=float, help="override the version's confidence threshold")
    s.add_argument(
        "--distance-threshold",
        type=float,
        help="override the version's threshold on the distance to its training data (0-2)",
    )
    s.add_argument(
        "--csv", metavar="OUT", help="write source, label, reason, Top-3 and distance to OUT"
    )
    s.add_argument(
        "--sort-into", metavar="DIR", help="copy each image into DIR/<label>/ (never overwrites)"
    )
    s.add_argument(
        "--keep-images",
        choices=["unknown", "all", "none"],
        default="unknown",
        help="which images keep a copy in the workspace for review (default unknown)",
    )
    s.add_argument(
        "--rescore",
        action="store_true",
        help="score content already stored with this version again",
    )
    s.add_argument(
        "--history-of",
        metavar="VERSION",
        help="score the images stored with VERSION (e.g. after a retrain) and print what changed",
    )
    s.add_argument(
        "--retry-failed",
        action="store_true",
        help="retry the recorded failures (and INPUTs, if any)",
    )
    s.add_argument(
        "--fetch-workers", type=int, default=16, help="concurrent URL downloads (default 16)"
    )
    s.add_argument(
        "--timeout", type=float, default=15.0, help="URL read timeout in seconds (default 15)"
    )
    s.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="score on Ray: alone, a Ray started for the run; 'auto' or HOST:PORT, a cluster",
    )
    s.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="model actors on Ray, one CPU each (default: the cluster's CPUs)",
    )
    s.add_argument(
        "--ray-shards",
        metavar="DIR",
        help="with --ray: actors write vectors as Parquet shards in DIR (shared by all nodes), "
        "which the store inserts in bulk",
    )
    s.add_argument(
        "--imagenet",
        action="store_true",
        help="no training: the backbone's own ImageNet Top-3 (not stored)",
    )
    s.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone for --imagenet")
    s.add_argument(
        "--show", type=int, default=20, help="how many predictions to print (default 20)"
    )
    s.set_defaults(func=cmd_score)

    q = sub.add_parser(
        "similar", parents=[common], help="nearest stored images to an image, an id or a class"
    )
    q.add_argument("image", nargs="?", metavar="IMAGE", help="an image file to search with")
    q.add_argument("--id", type=int, help="a stored image's id")
    q.add_argument("--class", dest="class_name", metavar="NAME", help="a class's centroid")
    q.add_argument("-k", type=int, default=10, help="how many neighbours (default 10)")
    q.add_argument("--max-distance", type=float, help="drop neighbours further than this (0-2)")
    q.add_argument(
        "--where",
        metavar="SQL_EXPR",
        help="filter over the predictions columns, e.g. \"label = 'UNKNOWN'\"",
    )
    q.add_argument("--model", help="model version (default: the active one)")
    q.set_defaults(func=cmd_similar)

    c = sub.add_parser(
        "cluster", parents=[common], help="cluster the UNKNOWN images; list, name, reject clusters"
    )
    c.add_argument(
        "--min-cluster-size",
        type=int,
        help="HDBSCAN (default: adapts to the number of UNKNOWNs, max(5, sqrt(n)/4))",
    )
    c.add_argument("--min-samples", type=int, help="HDBSCAN (default: the min cluster size)")
    c.add_argument("--pca-dims", type=int, default=50, help="PCA before UMAP (default 50)")
    c.add_argument(
        "--umap-dims", type=int, default=10, help="UMAP after PCA (default 10; 0: PCA only)"
    )
    c.add_argument(
        "--single-cluster",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the whole UNKNOWN set may come back as one cluster (default; --no-single-cluster: plain HDBSCAN)",
    )
    c.add_argument(
        "--poor-quality",
        action="store_true",
        help="cluster photos of poor quality too (left out by default: they are to be reshot)",
    )
    c.add_argument("--export", metavar="DIR", help="cluster folders here (default sieve/clusters)")
    c.add_argument("--list", action="store_true", help="list the clusters without re-running")
    c.add_argument("--name", nargs=2, metavar=("CLUSTER", "NAME"), help="name a cluster")
    c.add_argument("--reject", type=int, metavar="CLUSTER", help="mark a cluster rejected")
    c.add_argument(
        "--exclude", nargs="+", metavar=("CLUSTER", "ID"), help="leave these ids out of promotion"
    )
    c.add_argument("--model", help="model version (default: the active one)")
    c.set_defaults(func=cmd_cluster)

    pr = sub.add_parser(
        "promote", parents=[common], help="copy a cluster's images into the training data"
    )
    pr.add_argument("cluster", type=int, metavar="CLUSTER_ID")
    pr.add_argument(
        "--name", help="the class name; an existing one merges (default: the cluster's name)"
    )
    pr.add_argument(
        "--into",
        metavar="DATA_DIR",
        help="the training ImageFolder (default: the model version's training folder)",
    )
    pr.add_argument("--exclude", metavar="IDS", help="comma-separated ids to leave out")
    pr.add_argument("--model", help="model version (default: the active one)")
    pr.set_defaults(func=cmd_promote)

    im = sub.add_parser(
        "images", parents=[common], help="page through the stored images by filters and sort"
    )
    im.add_argument("--label", action="append", help="predicted label (repeat for any of them)")
    im.add_argument(
        "--reason",
        action="append",
        help="UNKNOWN reason: poor_quality, low_confidence, far_from_training",
    )
    im.add_argument("--class", dest="top1_class", action="append", help="Top-1 class")
    im.add_argument(
        "--human-label", action="append", help="label a person gave ('' for none given)"
    )
    im.add_argument(
        "--quality",
        action="append",
        help="photo quality flag: blurred, dark, bright, glare, low_information, too_small, "
        "odd_shape ('' for none)",
    )
    im.add_argument(
        "--duplicates",
        action="append",
        choices=["none", "kept", "set_aside"],
        help="near-duplicate state: none, kept (in a group, not set aside), set_aside",
    )
    im.add_argument("--min-confidence", type=float)
    im.add_argument("--max-confidence", type=float)
    im.add_argument("--min-distance", type=float)
    im.add_argument("--max-distance", type=float)
    im.add_argument("--batch", type=int, action="append", help="batch id")
    im.add_argument("--cluster", type=int, action="append", help="cluster id (-1: noise)")
    im.add_argument("--from", dest="day_from", type=_day, help="first UTC day (YYYY-MM-DD)")
    im.add_argument("--to", dest="day_to", type=_day, help="last UTC day (YYYY-MM-DD)")
    im.add_argument("--sort", default="id", choices=list(SORTS))
    im.add_argument("--limit", type=int, default=50, help="images shown (default 50)")
    im.add_argument("--offset", type=int, default=0, help="images skipped first")
    im.add_argument("--model", help="model version (default: the active one)")
    im.set_defaults(func=cmd_images)

    mp = sub.add_parser(
        "map", parents=[common], help="2-D map of the stored embeddings (the app's map)"
    )
    mp.add_argument("--color-by", default="label", choices=["label", "reason", "cluster", "class"])
    mp.add_argument(
        "--max-points", type=int, default=50_000, help="a sample beyond (default 50,000)"
    )
    mp.add_argument("--out", metavar="CSV", help="write id, x, y and the colour's value")
    mp.add_argument("--model", help="model version (default: the active one)")
    mp.set_defaults(func=cmd_map)

    bt = sub.add_parser(
        "batches", parents=[common], help="past scoring batches; --id one; --csv its report"
    )
    bt.add_argument("--id", type=int, help="one batch: its counts and failures")
    bt.add_argument(
        "--csv", metavar="OUT", help="write that batch's report (its inputs in order) as CSV"
    )
    bt.add_argument("--xlsx", metavar="OUT", help="write that batch's report as an Excel workbook")
    bt.add_argument(
        "--drift",
        nargs="?",
        const="batch",
        choices=["batch", "day"],
        help="whether each batch (or UTC day) departed from the training data: KS test of the "
        "distances to it against held-out known images'",
    )
    bt.add_argument("--limit", type=int, default=50, help="newest batches listed (default 50)")
    bt.set_defaults(func=cmd_batches)

    su = sub.add_parser(
        "suspects",
        parents=[common],
        help="training images whose label looks wrong (found at training); move or remove them",
    )
    how_su = su.add_mutually_exclusive_group()
    how_su.add_argument(
        "--relabel",
        nargs="+",
        metavar=("CLASS", "PATH"),
        help="move these suspected images into CLASS's folder (recorded, undoable)",
    )
    how_su.add_argument(
        "--remove",
        nargs="+",
        metavar="PATH",
        help="take these suspected images out of the training data (kept in trash for undo)",
    )
    su.add_argument("--limit", type=int, default=50, help="suspects listed (default 50)")
    su.add_argument("--model", help="model version (default: the active one)")
    su.set_defaults(func=cmd_suspects)

    du = sub.add_parser(
        "duplicates",
        parents=[common],
        help="groups of near-duplicate stored images, and contents stored under several names; "
        "keep one of a group",
    )
    du.add_argument(
        "--keep",
        type=int,
        metavar="ID",
        help="keep this image and set the rest of its group aside: not clustered or promoted "
        "(recorded, undoable)",
    )
    du.add_argument("--limit", type=int, default=20, help="groups listed (default 20, at most 100)")
    du.add_argument("--offset", type=int, default=0, help="groups skipped (default 0)")
    du.add_argument("--model", help="model version (default: the active one)")
    du.set_defaults(func=cmd_duplicates)

    rl = sub.add_parser(
        "relabel",
        parents=[common],
        help="give stored images a class; they join its training data",
    )
    rl.add_argument("ids", metavar="IDS", help="stored image ids, comma-separated")
    rl.add_argument("--label", required=True, help="the class (a new name starts a new class)")
    rl.add_argument(
        "--into", metavar="DATA_DIR", help="the training folder (default: the model's own)"
    )
    rl.add_argument("--model", help="model version (default: the active one)")
    rl.set_defaults(func=cmd_relabel)

    au = sub.add_parser("audit", parents=[common], help="the recorded review actions; --undo one")
    au.add_argument("--limit", type=int, default=50, help="newest actions shown (default 50)")
    au.add_argument(
        "--undo",
        type=int,
        nargs="?",
        const=0,
        metavar="ACTION_ID",
        help="undo an action (default: the latest not undone): store and files restored",
    )
    au.set_defaults(func=cmd_audit)

    th = sub.add_parser(
        "thresholds",
        parents=[common],
        help="UNKNOWN thresholds and what they mark; --preview or --set new ones",
    )
    how = th.add_mutually_exclusive_group()
    how.add_argument(
        "--preview",
        nargs=2,
        metavar=("CONFIDENCE", "DISTANCE"),
        help="count only (DISTANCE may be off)",
    )
    how.add_argument(
        "--set",
        nargs=2,
        metavar=("CONFIDENCE", "DISTANCE"),
        help="apply: stored images are re-decided (recorded, undoable)",
    )
    how.add_argument(
        "--target",
        metavar="RATE",
        help="count only, with the thresholds training would calibrate for this false-UNKNOWN "
        "rate (0.03 or 3%%)",
    )
    how.add_argument(
        "--tradeoff",
        action="store_true",
        help="per false-UNKNOWN rate (1-20%%): the calibrated thresholds, the test images they "
        "flag and the share of a never-seen type they catch",
    )
    how.add_argument(
        "--set-target",
        metavar="RATE",
        help="apply the thresholds training would calibrate for this false-UNKNOWN rate",
    )
    th.add_argument(
        "--quality",
        action="append",
        metavar="KEY=VALUE",
        help="photo quality bound, e.g. blur_max=0.8, glare_min=off, dark_max=auto "
        "(calibrated); repeatable; applied unless --preview",
    )
    th.add_argument("--model", help="model version (default: the active one)")
    th.set_defaults(func=cmd_thresholds)

    r = sub.add_parser(
        "reindex", parents=[common], help="check the FAISS indexes against DuckDB; --rebuild them"
    )
    r.add_argument("--rebuild", action="store_true", help="rebuild every index from DuckDB")
    r.set_defaults(func=cmd_reindex)

    sq = sub.add_parser(
        "sql",
        parents=[common],
        help="one read-only SQL query over the store (tables and ready-made views)",
        description="Run one read-only SQL query (SELECT, DESCRIBE, SHOW, EXPLAIN) over the "
        "store: tables batches, predictions, embeddings (a view over one embeddings_<size> table "
        "per embedding size), failures, reference_images, and "
        "ready-made views (--views lists them). No files, network or writes.",
    )
    sq.add_argument(
        "query", nargs="?", metavar="QUERY", help="the SQL, or '-' to read it from stdin"
    )
    sq.add_argument(
        "--limit",
        type=int,
        help="most rows to fetch; 0 = no limit (default 1000, or 1,000,000 with --out)",
    )
    sq.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds before the query is stopped (default 30; 0 = none)",
    )
    sq.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="output format (default table; --json means json)",
    )
    sq.add_argument("--out", metavar="FILE", help="write the rows as CSV to FILE, print a summary")
    sq.add_argument("--views", action="store_true", help="list the ready-made views and exit")
    sq.set_defaults(func=cmd_sql)

    m = sub.add_parser("models", parents=[common], help="list model versions; --activate one")
    m.add_argument("--activate", metavar="VERSION")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser(
        "demo", parents=[common], help="the built-in end-to-end demo on ELPV solar cells"
    )
    d.add_argument("--finetune-epochs", type=int, default=0)
    d.add_argument(
        "--no-serve", dest="serve", action="store_false", help="stop after populating the workspace"
    )
    _add_serve_args(d)
    d.set_defaults(func=cmd_demo)

    sv = sub.add_parser(
        "serve", parents=[common], help="the Gradio app and the REST API over the workspace"
    )
    _add_serve_args(sv)
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagesieve`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ws = Workspace.resolve(args.workspace)
    try:
        return args.func(args, ws) or 0
    except KeyboardInterrupt:
        print(f"imagesieve {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Exception as e:  # one line by the error table; a bug also logs its traceback
        kind, message = classify_error(e)
        if kind == "internal":
            log.exception("imagesieve %s: unexpected error", args.verb)
        elif kind == "busy":
            message = _busy_words(ws, args.verb) or message
        label = "internal error" if kind == "internal" else "error"
        print(f"imagesieve {args.verb}: {label}: {message}", file=sys.stderr)
        return KINDS[kind].exit_code


if __name__ == "__main__":
    sys.exit(main())
