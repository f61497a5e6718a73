"""The store against damaged files and full disks: journal, kept images, FAISS index, commits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from test_store import assert_index_matches_db, embedded, query
from tmpfs import tmpfs

from imagesieve._workspace import Workspace
from imagesieve.store import Store, VectorIndex
from imagesieve.store._images import keep_image, kept_path
from imagesieve.store._journal import Journal
from imagesieve.store._rows import new_table

DIM = 16


# -- the journal -----------------------------------------------------------------------------


def journaled(tmp_path: Path, groups: int = 6) -> tuple[Workspace, list[list[int]], list[int]]:
    """A store left as if killed: 4 rows committed, ``groups`` groups of 8 journaled, not folded.

    Returns the workspace, each group's ids and the journal's size after each group.
    """
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    store = Store(ws)
    batch = store.begin_batch("v1", ["serve"], {})
    store.commit(batch, "v1", embedded(rng, 0, 4, DIM))
    ids, ends = [], []
    for g in range(groups):
        start = 4 + 8 * g
        got = store.append(batch, "v1", embedded(rng, start, 8, DIM), counts={"n_items": start + 8})
        ids.append(got.tolist())
        ends.append(store._journal.size())
    store._journal.close()  # as if killed: answered, journaled, never folded
    store._con.close()
    return ws, ids, ends


def flip(path: Path, at: int, mask: int = 0xFF) -> None:
    """XOR one byte of a file in place (its size unchanged)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ mask]))


@pytest.mark.parametrize("where", ["payload", "length"])
def test_replay__one_damaged_frame_loses_only_its_rows(tmp_path, caplog, where):
    ws, ids, ends = journaled(tmp_path)
    journal = ws.root / "store.journal"
    starts = [0, *ends[:-1]]
    bad = 1 if where == "payload" else 2
    if where == "payload":
        flip(journal, starts[bad] + 16 + 200)  # a byte inside the Arrow stream
    else:
        flip(journal, starts[bad] + 4 + 7, 0x01)  # the top byte of the u64 length: 2**56 more
    before = journal.read_bytes()

    with caplog.at_level(logging.WARNING), Store(ws) as store:
        assert store.row_count("v1") == 4 + 8 * 5
    kept = sorted(r[0] for r in query(ws, "SELECT id FROM predictions"))
    assert kept == sorted([1, 2, 3, 4, *(i for g, got in enumerate(ids) if g != bad for i in got)])
    assert not set(ids[bad]) & set(kept)
    assert query(ws, "SELECT count(*) FROM embeddings") == [(44,)]
    assert journal.stat().st_size == 0
    (side,) = ws.root.glob("store.journal.damaged-*")
    assert side.read_bytes() == before  # kept aside as found, so the ranges below refer to it
    span = f"bytes {starts[bad]}-{ends[bad]} of {len(before)}"
    assert f"1 damaged span ({span}) failed the checksum" in caplog.text
    assert "the 5 whole entries around them are kept" in caplog.text
    assert f"the journal as found is kept in {side}" in caplog.text
    assert "cut short" not in caplog.text
    assert "40 rows a stopped process had answered" in caplog.text
    assert_index_matches_db(ws)


def test_replay__torn_tail_told_apart_from_damage_in_the_middle(tmp_path, caplog):
    ws, ids, ends = journaled(tmp_path, groups=4)
    journal = ws.root / "store.journal"
    flip(journal, ends[0] + 100)  # the second frame: answered, then damaged on disk
    with open(journal, "ab") as f:
        f.write(b"ISJ1\x00\x10\x00")  # a crash in the middle of the next append
    size = journal.stat().st_size

    with caplog.at_level(logging.WARNING), Store(ws) as store:
        assert store.row_count("v1") == 4 + 8 * 3
    assert f"1 damaged span (bytes {ends[0]}-{ends[1]} of {size}) failed the checksum" in (
        caplog.text
    )
    assert (
        f"the last 7 bytes ({ends[3]}-{size}) were cut short (the process stopped while writing "
        "them, before answering)" in caplog.text
    )
    assert len(list(ws.root.glob("store.journal.damaged-*"))) == 1


def test_journal_scan__resynchronises_on_the_next_whole_frame(tmp_path):
    journal = Journal(tmp_path / "j")
    rng = np.random.default_rng(0)
    tables, ends = [], []
    for g in range(5):
        preds = embedded(rng, 8 * g, 8, DIM)
        emb = np.stack([p.embedding for p in preds])
        tables.append(new_table(np.arange(8 * g, 8 * g + 8), preds, emb, "v1", 1, None))
        journal.append(tables[-1], {"batch_id": 1, "g": g})
        ends.append(journal.size())
    journal.close()
    flip(journal.path, 3)  # the first frame's MAGIC
    flip(journal.path, ends[3] - 1)  # the last byte of the fourth frame
    found = journal.scan()
    assert [m["g"] for _, m in found.frames] == [1, 2, 4]
    assert all(t.equals(tables[m["g"]]) for t, m in found.frames)
    assert [(d.start, d.end, d.torn) for d in found.damage] == [
        (0, ends[0], False),
        (ends[2], ends[3], False),
    ]
    path = journal.keep_damaged(found)
    assert path.read_bytes() == journal.path.read_bytes()
    assert journal.keep_damaged(found) != path  # a second copy in the same second: its own name


# -- kept images -----------------------------------------------------------------------------


def test_keep_image__a_damaged_copy_is_replaced_by_the_next_keep(tmp_path, caplog):
    ws = Workspace(tmp_path / "ws")
    data = os.urandom(50_000)
    sha = hashlib.sha256(data).hexdigest()
    path = keep_image(ws, sha, data)
    path.write_bytes(data[:20_000])  # a truncated copy, as a full disk left it before
    assert keep_image(ws, sha, data).read_bytes() == data
    assert "a kept copy of the wrong size" in caplog.text
    source = tmp_path / "image.bin"
    source.write_bytes(data)
    path.write_bytes(bytes(50_000))  # the right size, the wrong bytes
    assert keep_image(ws, sha, str(source)).read_bytes() == data
    assert "a kept copy whose content is not its SHA-256" in caplog.text
    assert [p.name for p in path.parent.iterdir()] == [sha]


@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_keep_image__full_disk_raises_and_leaves_nothing(tmp_path, kind):
    ws = Workspace(tmp_path / "ws")
    data = os.urandom(400_000)
    sha = hashlib.sha256(data).hexdigest()
    source = tmp_path / "image.bin"
    source.write_bytes(data)
    with tmpfs(ws.images_dir, "256k"):
        with pytest.raises(OSError, match="No space left on device"):
            keep_image(ws, sha, data if kind == "bytes" else str(source))
        assert not kept_path(ws, sha).exists()
        assert [p.name for p in ws.images_dir.rglob("*") if p.is_file()] == []


def test_store__leftover_image_tmp_files_removed_on_open(tmp_path):
    ws = Workspace(tmp_path / "ws")
    Store(ws).close()
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    kept = keep_image(ws, sha, data)
    folder = kept.parent
    left = folder / f".{sha}.0.140.tmp"  # a process that died mid-copy (no pid is 0)
    left.write_bytes(data[:10])
    other = ws.images_dir / "ff" / f".{'f' * 64}.0.7.tmp"
    other.parent.mkdir(exist_ok=True)  # the kept image may be in "ff" too (1 in 256)
    other.write_bytes(b"x")
    busy = folder / f".{sha}.{os.getpid()}.9.tmp"  # this process, maybe mid-copy: left alone
    busy.write_bytes(b"y")
    with Store(ws, read_only=True):
        assert left.exists()  # a reader removes nothing
    with Store(ws):
        pass
    assert not left.exists() and not other.exists()
    assert busy.exists() and kept.read_bytes() == data


# -- the FAISS index -------------------------------------------------------------------------


def stored(tmp_path: Path, n: int = 300) -> tuple[Workspace, np.ndarray, np.ndarray]:
    """A closed store of ``n`` rows with a saved index; (ids, vectors) as DuckDB holds them."""
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(5)
    with Store(ws) as store:
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(rng, 0, n, DIM))
        store.finish_batch(batch, "done", {})
    rows = query(ws, "SELECT id, embedding FROM embeddings ORDER BY id")
    return ws, np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32)


def brute_force(xq: np.ndarray, ids: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """The ids of each query's ``k`` largest inner products, by a full sort."""
    return ids[np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]]


def queries(n: int = 20) -> np.ndarray:
    xq = np.random.default_rng(9).normal(size=(n, DIM))
    return (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)


def damage_vectors(path: Path) -> None:
    """Turn 64 floats in the middle of a saved index's vector data huge; its size stays."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2 - 128)
        f.write(np.full(64, 1e6, np.float32).tobytes())


def garble_header(path: Path) -> None:
    """Zero the first 64 bytes of a saved index (FAISS's header)."""
    with open(path, "r+b") as f:
        f.write(bytes(64))


def test_store_index__damaged_vectors_of_unchanged_size_are_rebuilt_before_a_search(
    tmp_path, caplog
):
    ws, ids, xb = stored(tmp_path)
    path = ws.root / "index" / "v1.faiss"
    size = path.stat().st_size
    damage_vectors(path)
    assert path.stat().st_size == size
    xq = queries()
    want = brute_force(xq, ids, xb, 10)
    _, raw = faiss.read_index(str(path)).search(xq, 10)
    assert not np.array_equal(raw, want)  # the damage does change answers

    with caplog.at_level(logging.WARNING), Store(ws) as store:
        assert (
            store.indexes.checks[0].action == "in_sync"
        )  # opening trusts the sidecar's figures ...
        got, _ = store.indexes.get("v1").search(xq, 10)  # ... the first use checks the file
        assert np.array_equal(got, want)
        (check,) = store.indexes.checks
        assert (check.action, check.rows) == ("rebuilt", 300)
        assert "(damaged)" in check.details["damaged"]
    assert f"{path}: checksum" in caplog.text
    assert "not used: rebuilt from the 300 rows of v1 in the store" in caplog.text
    assert VectorIndex.open(path).verified
    assert_index_matches_db(ws)


def test_cli_reindex__checks_the_file_itself(tmp_path, capsys):
    from imagesieve.cli import main

    ws, ids, xb = stored(tmp_path)
    path = ws.root / "index" / "v1.faiss"
    damage_vectors(path)  # same size, so the sidecar still agrees
    assert main(["reindex", "--workspace", str(ws.root), "--json"]) == 0
    (check,) = json.loads(capsys.readouterr().out)["indexes"]
    assert (check["action"], check["rows"]) == ("rebuilt", 300)
    assert main(["reindex", "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["indexes"][0]["action"] == "in_sync"
    assert_index_matches_db(ws)


def test_store_index__garbled_header_rebuilt_with_every_row_and_saved_whole(tmp_path):
    ws, ids, xb = stored(tmp_path)
    path = ws.root / "index" / "v1.faiss"
    garble_header(path)
    assert VectorIndex.load(path) is None
    with Store(ws) as store:
        index = store.indexes.get("v1")
        assert index.ntotal == 300 and store.indexes.checks[0].action == "rebuilt"
        xq = queries()
        assert np.array_equal(index.search(xq, 10)[0], brute_force(xq, ids, xb, 10))
    saved = VectorIndex.open(path)
    assert saved.verified and saved.stats() == (300, 300, 300 * 301 // 2)
    assert_index_matches_db(ws)


def test_store_index__an_index_that_fails_to_load_is_never_saved_over(tmp_path):
    # Before: the first commit after opening loaded nothing, started an EMPTY index, added the
    # new rows to it and saved that over the file at close: 8 vectors for 308 rows.
    ws, _, _ = stored(tmp_path)
    path = ws.root / "index" / "v1.faiss"
    garble_header(path)
    with Store(ws) as store:
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(np.random.default_rng(6), 300, 8, DIM))
        store.finish_batch(batch, "done", {})
        assert store.indexes.get("v1").ntotal == 308
    saved = VectorIndex.open(path)
    assert saved.verified and saved.ntotal == 308
    assert_index_matches_db(ws)


def test_store_index__older_sidecar_without_checksum_accepted_then_upgraded(tmp_path, caplog):
    ws, ids, xb = stored(tmp_path)
    path = ws.root / "index" / "v1.faiss"
    sidecar = path.with_suffix(".json")
    side = json.loads(sidecar.read_text())
    del side["crc32"]
    sidecar.write_text(json.dumps(side))
    with caplog.at_level(logging.WARNING), Store(ws) as store:
        assert store.indexes.get("v1").ntotal == 300
        assert store.indexes.checks[0].action == "in_sync"  # its figures agree with DuckDB: kept
        assert "crc32" in json.loads(sidecar.read_text())  # and its sidecar now has a checksum
    assert "rebuilt" not in caplog.text and "not used" not in caplog.text
    garble_header(path)  # and without one, an unreadable file is rebuilt
    sidecar.write_text(json.dumps(side))
    with Store(ws) as store:
        assert store.indexes.get("v1").ntotal == 300 and store.indexes.checks[0].action == "rebuilt"
        assert "FAISS cannot read it" in store.indexes.checks[0].details["damaged"]
    assert_index_matches_db(ws)


# -- commits ---------------------------------------------------------------------------------


def test_transaction__a_failed_commit_raises_its_own_error(tmp_path):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    with tmpfs(ws.root, "3m"):
        store = Store(ws)
        try:
            batch = store.begin_batch("v1", ["test"], {})
            with pytest.raises(Exception, match="No space left on device") as failed:
                for start in range(0, 5000, 100):  # ~0.5 MB a commit, until the disk is full
                    store.commit(batch, "v1", embedded(rng, start, 100, 1280))
            # not "cannot rollback - no transaction is active", which hid it before
            assert "rollback" not in str(failed.value).lower()
        finally:
            store._con.close()
