"""Read-only SQL over the store: one SELECT at a time, no file or network access, bounded.

Untrusted SQL is kept in by layers, each enough on its own for what it guards:

* the transaction: every query runs in ``BEGIN TRANSACTION READ ONLY`` and is rolled back, so
  DuckDB refuses any write whatever the statement text (a data-modifying CTE included), on the
  writer's own connection too;
* the connection (``SAFE_CONFIG``: no external access, no extensions; ``read_only=True`` for
  the console);
* the statement check: one statement, SELECT or EXPLAIN of a SELECT, no housekeeping functions,
  no function whose output size is set by an argument (``repeat('x', 1e9)``), bounded length
  and nesting;
* the run: a time limit, a row limit, a result-size limit, and optionally a memory watchdog
  that stops the query when the process grows past a budget (DuckDB's own ``memory_limit``
  bounds only its buffer-managed operators).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import decimal
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import duckdb
import numpy as np

from imagesieve._errors import NotFoundError, SieveError
from imagesieve.store._schema import VIEWS, views_sql
from imagesieve.store._store import STORE_FILE, Store, StoreBusyError, fold_stopped_journal

if TYPE_CHECKING:
    from imagesieve._workspace import Workspace

__all__ = ["SAFE_CONFIG", "SqlError", "SqlResult", "open_readonly", "run_sql", "run_store_sql"]

log = logging.getLogger(__name__)

#: DuckDB configuration for connections that run untrusted SQL. ``lock_configuration`` comes
#: last: once set, no ``SET``/``PRAGMA`` can change the others back.
SAFE_CONFIG: dict[str, Any] = {
    "enable_external_access": False,  # no files, URLs, ATTACH, COPY, INSTALL/LOAD, Python scans
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,
}

#: Table functions allowed in a SELECT that still have side effects (checkpoints, log
#: truncation, external resources) or run SQL hidden in a string past the statement check.
DENIED_FUNCTIONS = frozenset(
    {
        "checkpoint",
        "force_checkpoint",
        "truncate_duckdb_logs",
        "enable_logging",
        "disable_logging",
        "enable_profiling",
        "disable_profiling",
        "create_external_resource",
        "destroy_external_resource",
        "register_external_resource",
        "register_external_resource_type",
        "deregister_external_resource",
        "query",
        "json_execute_serialized_sql",
    }
)

#: Scalar functions whose result size is set by an argument, not by the data read: one call
#: can allocate gigabytes where no time or memory limit reaches (DuckDB builds the value in one
#: piece: ``len(range(100000000))`` took 7 GB and 26 s, uninterruptible). The table functions
#: of the same names stream and stay allowed (``FROM range(10)``).
AMPLIFYING_FUNCTIONS = frozenset(
    {
        "range",
        "generate_series",
        "repeat",
        "lpad",
        "rpad",
        "printf",
        "format",
        "list_resize",
        "array_resize",
        "bar",
    }
)
#: Longest statement accepted, in characters.
MAX_SQL_CHARS = 100_000
#: Deepest nesting of parentheses accepted (DuckDB's own limit is 1,000 expression levels;
#: the statement check walks the parse tree, so a bound well below Python's recursion limit).
MAX_NESTING = 200
#: How often the memory watchdog looks at the process's size (s).
WATCH_EVERY = 0.01

# -- errors and results ----------------------------------------------------------------------


class SqlError(SieveError, ValueError):
    """A query that was refused or failed; the message is one line."""


def _message(e: BaseException) -> str:
    """DuckDB's first message line, with its "Did you mean" hint when it gives one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    hint = next((line for line in lines[1:3] if line.startswith("Did you mean")), None)
    return f"{lines[0]} {hint}" if hint else lines[0]


def _json_value(v: Any) -> Any:
    """A DuckDB value as JSON: ISO timestamps, numbers as float, bytes as hex, NaN as null."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        return _json_value(float(v))
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return _json_value(v.tolist())
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return str(v)


def _short_float32(v: Any) -> Any:
    """A FLOAT (or FLOAT[]) value as the shortest decimal that reads back as the same float32."""
    if isinstance(v, float):
        return float(str(np.float32(v)))
    if isinstance(v, list):
        return [_short_float32(x) for x in v]
    return v


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple | dict):
        return json.dumps(_json_value(v))
    j = _json_value(v)
    return j if isinstance(j, str) else str(j)


def _float_text(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-4 <= abs(x) < 1e15:
        return repr(round(x, 6))
    return f"{x:.6g}"


def _text_value(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _float_text(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_text_value(x) for x in v) + "]"
    if isinstance(v, dt.datetime):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    return str(v)


def _clip(text: str, width: int) -> str:
    text = text.replace("\r", "").replace("\n", "↵").replace("\t", " ")
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | decimal.Decimal) and not isinstance(v, bool)


@dataclass
class SqlResult:
    """The rows of one query (at most the limit asked for) and how long it took."""

    columns: list[str]
    rows: list[tuple]
    truncated: bool = False  # more rows than the limit: the rest were not fetched
    seconds: float = 0.0
    types: list[str] = field(default_factory=list)  # DuckDB's type of each column

    def _rows_for_output(self) -> Iterator[tuple]:
        """Rows with FLOAT values as written (0.4, not 0.4000000059604645)."""
        short = {i for i, t in enumerate(self.types) if t.startswith("FLOAT")}
        for row in self.rows:
            if short:
                row = tuple(_short_float32(v) if i in short else v for i, v in enumerate(row))
            yield row

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: columns, types, rows as lists."""
        return {
            "columns": list(self.columns),
            "types": list(self.types),
            "rows": [[_json_value(v) for v in row] for row in self._rows_for_output()],
            "row_count": len(self.rows),
            "truncated": self.truncated,
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SqlResult:
        """The result ``to_dict`` gave (a server's answer to a CLI beside it)."""
        return cls(
            list(doc["columns"]),
            [tuple(row) for row in doc["rows"]],
            bool(doc["truncated"]),
            float(doc["seconds"]),
            list(doc.get("types") or []),
        )

    def to_csv(self, path_or_file: str | os.PathLike | IO[str]) -> None:
        """Write a header and the rows as CSV (NULL as an empty cell, lists as JSON)."""
        if isinstance(path_or_file, str | os.PathLike):
            with open(path_or_file, "w", newline="", encoding="utf-8") as f:
                self.to_csv(f)
            return
        writer = csv.writer(path_or_file)
        writer.writerow(self.columns)
        for row in self._rows_for_output():
            writer.writerow([_csv_value(v) for v in row])

    def to_text(self, max_width: int = 40) -> str:
        """An aligned plain-text table, cells cut to ``max_width`` characters, and a footer."""
        if self.columns == ["explain_key", "explain_value"]:  # EXPLAIN: the plan as drawn
            body = "\n".join(str(value).rstrip("\n") for _, value in self.rows)
            return f"{body}\n({self.seconds:.2f} s)"
        header = [_clip(c, max_width) for c in self.columns]
        cells = [[_clip(_text_value(v), max_width) for v in row] for row in self.rows]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
        right = [
            any(_is_number(row[i]) for row in self.rows)
            and all(row[i] is None or _is_number(row[i]) for row in self.rows)
            for i in range(len(header))
        ]

        def line(values: list[str]) -> str:
            cells = zip(values, widths, right, strict=True)
            return " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in cells).rstrip()

        out = [line(header), "-+-".join("-" * w for w in widths)]
        out += [line(r) for r in cells]
        n = len(self.rows)
        if self.truncated:
            out.append(f"(first {n} rows, more not fetched: limit reached; {self.seconds:.2f} s)")
        else:
            out.append(f"({n} row{'' if n == 1 else 's'}, {self.seconds:.2f} s)")
        return "\n".join(out)


# -- opening and running ----------------------------------------------------------------------


def open_readonly(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """Open the workspace's store read-only with ``SAFE_CONFIG``, ready-made views included.

    Raises:
        SieveError: nothing was stored in the workspace yet, or DuckDB cannot open the store.
        StoreBusyError: another process has the store open for writing.
    """
    path = ws.root / STORE_FILE
    if not path.is_file():
        raise NotFoundError(f"no store in {ws.root} yet: score some images first")
    fold_stopped_journal(ws)
    try:
        con = duckdb.connect(str(path), read_only=True, config=dict(SAFE_CONFIG))
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise StoreBusyError.held(path, e) from None
        raise SieveError(f"cannot open the store {path}: {_message(e)}", "store") from e
    except duckdb.ConnectionException as e:  # open in this process with another configuration
        raise StoreBusyError(
            f"the store {path} is already open in this process: {_message(e)}"
        ) from None
    try:
        have = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        for name, statement in zip(VIEWS, views_sql(temporary=True), strict=True):
            if name in have:  # a store written before a view existed lacks it
                continue
            try:
                con.execute(statement)
            except (duckdb.CatalogException, duckdb.BinderException):  # newer than the store
                log.info("view %s left out: this store predates its tables", name)
    except duckdb.Error as e:
        con.close()
        raise SieveError(f"cannot open the store {path}: {_message(e)}", "store") from e
    return con


_EXPLAIN = re.compile(r"\s*EXPLAIN\b\s*(?:ANALY[SZ]E\b|\([^)]*\))?(.*)", re.IGNORECASE | re.DOTALL)
_FIRST_WORD = re.compile(r"\s*([A-Za-z_]+)")


def _kind(statement: Any) -> str:
    """What the user would call the statement: its first keyword (CHECKPOINT, INSTALL) or type."""
    m = _FIRST_WORD.match(statement.query)
    word = m.group(1).upper() if m else ""
    return word if word and word not in ("WITH", "FROM") else statement.type.name


def _parse_facts(
    con: duckdb.DuckDBPyConnection, select_sql: str
) -> tuple[set[str], set[str], set[str]]:
    """What a SELECT does, from DuckDB's parse tree: the functions it calls and the writes in it.

    (scalar or aggregate function names, table function names, data-modifying query kinds such
    as DELETE inside a WITH). Without a parse tree, every name followed by "(" counts as both
    kinds of function.
    """
    try:
        tree = json.loads(
            con.execute("SELECT json_serialize_sql(?)", [select_sql]).fetchall()[0][0]
        )
    except RecursionError:
        raise SqlError(f"query nested too deeply (over {MAX_NESTING} levels)") from None
    except (duckdb.Error, ValueError, TypeError):
        tree = {"error": True}
    if tree.get("error"):
        names = set(re.findall(r"([a-z_][a-z0-9_]*)\s*\(", select_sql.lower().replace('"', "")))
        return names, names, set()
    scalar: set[str] = set()
    table: set[str] = set()
    writes: set[str] = set()
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        node, is_table = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("function_name"), str):
                (table if is_table else scalar).add(node["function_name"].lower())
            kind = node.get("type")
            if isinstance(kind, str) and kind.endswith("_QUERY_NODE"):
                writes.add(kind.removesuffix("_QUERY_NODE").replace("_", " "))
            table_ref = kind == "TABLE_FUNCTION"
            stack.extend((v, table_ref and k == "function") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, False) for v in node)
    return scalar, table, writes


def _nesting(sql: str) -> int:
    """The deepest nesting of parentheses and brackets in ``sql`` (quotes not parsed: an upper bound)."""
    depth = deepest = 0
    for ch in sql:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _checked_statement(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    """The one read-only statement in ``sql``, or SqlError saying why not."""
    if len(sql) > MAX_SQL_CHARS:
        raise SqlError(f"query is {len(sql):,} characters, over the {MAX_SQL_CHARS:,} limit")
    if _nesting(sql) > MAX_NESTING:
        raise SqlError(f"query nested too deeply (over {MAX_NESTING} levels)")
    try:
        statements = con.extract_statements(sql)
    except RecursionError:
        raise SqlError(f"query nested too deeply (over {MAX_NESTING} levels)") from None
    except duckdb.Error as e:
        raise SqlError(_message(e)) from None
    if not statements:
        raise SqlError("no SQL statement given")
    if len(statements) > 1:
        raise SqlError(f"one statement at a time, got {len(statements)}")
    statement = statements[0]
    select_sql = statement.query
    refused = None
    if statement.type == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs its statement: only a SELECT may follow.
        m = _EXPLAIN.match(statement.query)
        try:
            inner = con.extract_statements(m.group(1)) if m else []
        except duckdb.Error:
            inner = []
        if len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
            refused = "EXPLAIN " + (_kind(inner[0]) if len(inner) == 1 else "of that statement")
        else:
            select_sql = inner[0].query
    elif statement.type != duckdb.StatementType.SELECT:
        refused = _kind(statement)
    if refused:
        raise SqlError(f"only read-only queries (SELECT) are allowed, got {refused}")
    scalar, table, writes = _parse_facts(con, select_sql)
    if writes:
        raise SqlError(
            f"only read-only queries (SELECT) are allowed, got {sorted(writes)[0]} inside the query"
        )
    denied = sorted((scalar | table) & DENIED_FUNCTIONS)
    if denied:
        raise SqlError(f"function {denied[0]}() is not allowed in read-only queries")
    amplifying = sorted(scalar & AMPLIFYING_FUNCTIONS)
    if amplifying:
        raise SqlError(
            f"function {amplifying[0]}() is not allowed here: its result size is set by an "
            "argument (the table function, FROM range(n), is allowed)"
        )
    return statement


def _value_bytes(v: Any) -> int:
    """About how many bytes a fetched value holds (strings and blobs by length)."""
    if isinstance(v, str | bytes | bytearray):
        return len(v) + 50
    if isinstance(v, list | tuple):
        return 56 + sum(_value_bytes(x) for x in v)
    if isinstance(v, dict):
        return 64 + sum(_value_bytes(k) + _value_bytes(x) for k, x in v.items())
    return 32


def _rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_sql(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    limit: int | None = 10_000,
    timeout: float | None = 30.0,
    max_bytes: int | None = None,
    max_memory: int | None = None,
) -> SqlResult:
    """Run one read-only statement; at most ``limit`` rows, stopped after ``timeout`` seconds.

    The statement runs in a read-only transaction that is always rolled back, so it cannot
    write even on the writer's connection (pass a cursor there: the transaction is the
    cursor's). Rows past ``max_bytes`` of result are not fetched (``truncated``); with
    ``max_memory``, the query is stopped once the process has grown by that many bytes since
    it started. None means no limit.

    Raises:
        SqlError: the statement was refused, failed, or ran out of time or memory (one line).
    """
    if limit is not None and limit < 0:
        raise SqlError(f"limit must be 0 or more, got {limit}")
    if timeout is not None and timeout <= 0:
        raise SqlError(f"timeout must be positive, got {timeout}")
    statement = _checked_statement(con, sql)
    lock = threading.Lock()
    state = {"running": True, "stopped": None}
    done = threading.Event()

    def stop(why: str) -> None:
        with lock:
            if state["running"] and state["stopped"] is None:
                state["stopped"] = why
                con.interrupt()

    def watch(budget: int) -> None:
        ceiling = _rss_bytes() + budget
        while not done.wait(WATCH_EVERY):
            if _rss_bytes() > ceiling:
                stop(f"query stopped: it needed over {budget / 2**20:,.0f} MB (memory limit)")
                return

    timer = threading.Timer(timeout, stop, [f"query stopped after {timeout:g} s (time limit)"])
    t0 = time.perf_counter()
    truncated = False
    try:
        if timeout is not None:
            timer.daemon = True
            timer.start()
        if max_memory is not None:
            threading.Thread(
                target=watch, args=(max_memory,), name="sql-watch", daemon=True
            ).start()
        con.execute("BEGIN TRANSACTION READ ONLY")
        try:
            con.execute(statement)
            description = con.description or []
            rows: list[tuple] = []
            size = 0
            want = limit + 1 if limit is not None else None
            while not truncated and (want is None or len(rows) < want):
                chunk = con.fetchmany(min(1024, want - len(rows)) if want else 1024)
                if not chunk:
                    break
                for row in chunk:
                    size += 16 + sum(_value_bytes(v) for v in row)
                    if max_bytes is not None and size > max_bytes:
                        truncated = True
                        break
                    rows.append(row)
        finally:
            # DuckDB streams results: drop the unread rest, then end the transaction
            with contextlib.suppress(duckdb.Error):
                con.abort()
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
    except duckdb.Error as e:
        if state["stopped"]:
            raise SqlError(state["stopped"]) from None
        if isinstance(e, duckdb.InterruptException):
            raise SqlError("query interrupted") from None
        raise SqlError(_message(e)) from None
    except MemoryError:
        raise SqlError("query stopped: out of memory") from None
    finally:
        with lock:
            state["running"] = False
        done.set()
        timer.cancel()
    if state["stopped"]:
        raise SqlError(state["stopped"])
    seconds = time.perf_counter() - t0
    if limit is not None and len(rows) > limit:
        rows, truncated = rows[:limit], True
    log.debug("sql: %d rows in %.3f s%s", len(rows), seconds, " (truncated)" if truncated else "")
    return SqlResult(
        columns=[d[0] for d in description],
        rows=rows,
        truncated=truncated,
        seconds=seconds,
        types=[str(d[1]) for d in description],
    )


def run_store_sql(
    store: Store, sql: str, *, executor: Executor | None = None, **limits: Any
) -> SqlResult:
    """``run_sql`` over a live store, on a cursor of its own, without holding the store's lock.

    The cursor is taken (and the store's journal folded) on the calling thread; the query then
    runs on ``executor`` when given (a server's low-priority threads). ``limits`` are
    ``run_sql``'s keywords.
    """
    with store.cursor() as cursor:
        if executor is None:
            return run_sql(cursor, sql, **limits)
        return executor.submit(run_sql, cursor, sql, **limits).result()
