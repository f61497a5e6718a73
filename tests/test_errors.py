"""The error table: each kind's HTTP status and exit code, each library error's kind, the doors."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import duckdb
import pytest
import requests

from imagesieve import cli
from imagesieve._errors import KINDS, SieveError, UserError, classify_error, require_full_install
from imagesieve._workspace import Workspace
from imagesieve.app import Service, ServiceError, start_server
from imagesieve.data import ImageLoadError, load_image
from imagesieve.ingest import FetchOptions, InputError
from imagesieve.models import MissingWeightsError, get_backbone_spec, get_version
from imagesieve.search import ReviewError, SimilarError
from imagesieve.store import SqlError, StoreBusyError, open_readonly

README = Path(__file__).resolve().parents[1] / "README.md"
#: The documented contract (README, "Errors"): kind -> (HTTP status, CLI exit code).
EXPECTED = {
    "bad_request": (400, 2),
    "too_large": (413, 2),
    "conflict": (409, 2),
    "bad_image": (422, 2),
    "no_model": (503, 2),
    "missing_weights": (503, 2),
    "busy": (503, 2),
    "stopping": (503, 2),
    "read_only": (503, 2),
    "disk_full": (507, 2),
    "disk": (500, 2),
    "store": (500, 2),
    "full_install": (501, 2),
    "internal": (500, 1),
}
DISK_FULL = "the server's disk is full: nothing was stored; retry once space is freed on it"
READ_ONLY = "the server cannot write to its workspace (read-only file system or no permission)"
BUG = " (a bug: please report it with the traceback above)"
#: One error of each library class (and kind), with the kind it is answered as.
LIBRARY_ERRORS = [
    (ImageLoadError("a.png", "not_image", "not a recognised image format"), "bad_image"),
    (ImageLoadError("a.png", "too_large", "file is over the 10-byte limit"), "too_large"),
    (InputError("meters.xlsx has no URL column; columns: meter, link"), "bad_request"),
    (SqlError("only read-only queries (SELECT) are allowed, got DELETE"), "bad_request"),
    (SimilarError("no stored image with id 9 for model v1"), "bad_request"),
    (ReviewError("cluster 3 was rejected; name it again to promote it"), "bad_request"),
    (StoreBusyError("the store /ws/store.duckdb is in use by another imagesieve process"), "busy"),
    (MissingWeightsError("weights file not found: /w.pth"), "missing_weights"),
    (UserError("nothing to score: give image files"), "bad_request"),
    (UserError("no active model in workspace /ws", "no_model"), "no_model"),
    (SieveError("cannot open the store /ws/store.duckdb: IO Error", "store"), "store"),
    (ServiceError("3 files is over the limit of 2 per upload", "too_large"), "too_large"),
    (ServiceError("the server is stopping", "stopping"), "stopping"),
    (ServiceError("a training run is already going"), "bad_request"),
]


def caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def raising(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


# -- the table -----------------------------------------------------------------------------------


def test_kinds__are_the_documented_ones():
    assert sorted(KINDS) == sorted(EXPECTED)


@pytest.mark.parametrize("kind", list(KINDS))
def test_kinds__map_to_the_documented_status_and_exit_code(kind):
    assert (KINDS[kind].status, KINDS[kind].exit_code) == EXPECTED[kind]


def test_kinds__the_readme_table_is_the_contract():
    rows = re.findall(r"^\s*\|([^|]*)\| (\d{3}) \| (\d) \|$", README.read_text(), re.MULTILINE)
    documented = {
        kind: (int(status), int(code))
        for kinds, status, code in rows
        for kind in re.findall(r"`(\w+)`", kinds.split(":")[0])
    }
    assert documented == EXPECTED


# -- classify_error ------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "kind"), LIBRARY_ERRORS)
def test_classify_error__a_library_error_by_its_kind(error, kind):
    assert classify_error(error) == (kind, str(error))
    assert classify_error(error, server=True) == (kind, str(error))


@pytest.mark.parametrize("name", ["torch", "torchvision.transforms", "matplotlib.figure"])
def test_classify_error__a_full_install_package_missing_is_the_slim_install(name):
    e = ModuleNotFoundError(f"No module named '{name}'", name=name)
    kind, line = classify_error(e)
    assert kind == "full_install"
    assert line == f"{name} is not installed: this is the slim serving install" + (
        " (the full install: pip install 'imagesieve[train]')"
    )
    assert classify_error(e, server=True) == ("full_install", KINDS["full_install"].message)
    other = ModuleNotFoundError("No module named 'yaml'", name="yaml")
    assert classify_error(other)[0] == "internal"


def test_require_full_install__refuses_in_one_line_where_torch_is_missing(monkeypatch):
    import importlib.util

    require_full_install("Grad-CAM")  # this install has torch
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(SieveError) as e:
        require_full_install("Grad-CAM")
    assert classify_error(e.value) == (
        "full_install",
        "Grad-CAM needs torch, which this slim install leaves out"
        " (the full install: pip install 'imagesieve[train]')",
    )


def test_classify_error__errors_the_library_raises(tmp_path):
    ws = Workspace(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    for call, kind, text in [
        (lambda: get_version(ws), "no_model", f"no active model in workspace {ws.root}"),
        (lambda: get_backbone_spec("vgg"), "bad_request", "unknown backbone 'vgg'; known"),
        (lambda: open_readonly(ws), "bad_request", f"no store in {ws.root} yet"),
        (lambda: FetchOptions(workers=0), "bad_request", "workers must be at least 1, got 0"),
        (lambda: load_image(tmp_path / "notes.png"), "bad_image", "not a recognised image"),
    ]:
        with pytest.raises(SieveError) as e:
            call()
        assert classify_error(e.value)[0] == kind and text in classify_error(e.value)[1]


@pytest.mark.parametrize(
    ("error", "cli_answer", "server_answer"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/ws/images/ab.png"),
            ("disk_full", "/ws/images/ab.png: no space left on device (the disk is full: "),
            ("disk_full", DISK_FULL),
        ),
        (
            caused(ServiceError("upload:a.png: cannot keep it"), OSError(errno.ENOSPC, "full")),
            ("disk_full", "upload:a.png: cannot keep it (the disk is full: "),
            ("disk_full", DISK_FULL),
        ),
        (
            duckdb.IOException('IO Error: Cannot open file "/ws/s": Read-only file system'),
            (
                "read_only",
                'IO Error: Cannot open file "/ws/s": Read-only file system (the workspace is',
            ),
            ("read_only", READ_ONLY),
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/a.png"),
            ("disk", "/data/a.png: permission denied"),
            ("read_only", READ_ONLY),
        ),
        (
            caused(ServiceError("upload:a.png: cannot keep it"), NotADirectoryError(20, "no")),
            ("bad_request", "upload:a.png: cannot keep it"),
            ("disk", "upload:a.png: cannot keep it"),
        ),
        (
            FileNotFoundError("data folder not found: /data"),
            ("disk", "data folder not found: /data"),
            ("internal", "internal error (FileNotFoundError); see the server log"),
        ),
        (
            duckdb.CatalogException("Catalog Error: Table with name batches does not exist!"),
            ("store", "Catalog Error: Table with name batches does not exist!"),
            ("internal", "internal error (CatalogException); see the server log"),
        ),
    ],
)
def test_classify_error__the_system_s_errors(error, cli_answer, server_answer):
    kind, line = classify_error(error)
    assert kind == cli_answer[0] and line.startswith(cli_answer[1]), line
    kind, line = classify_error(error, server=True)
    assert kind == server_answer[0] and line.startswith(server_answer[1]), line


@pytest.mark.parametrize("error", [ValueError("boom"), RuntimeError("boom"), KeyError("boom")])
def test_classify_error__anything_else_is_internal(error):
    name = type(error).__name__
    assert classify_error(error) == ("internal", f"{name}: {str(error)}{BUG}")
    assert classify_error(error, server=True) == (
        "internal",
        f"internal error ({name}); see the server log",
    )


# -- the CLI -------------------------------------------------------------------------------------


def test_main__a_library_error_is_one_line_exit_2(tmp_path, capsys):
    ws = Workspace(tmp_path)
    assert cli.main(["sql", "SELECT 1", "--workspace", str(ws.root)]) == 2
    assert capsys.readouterr().err == (
        f"imagesieve sql: error: no store in {ws.root} yet: score some images first\n"
    )


def test_main__a_bug_is_an_internal_error_exit_1_after_its_traceback(
    tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.setattr(cli, "cmd_models", raising(ValueError("boom")))
    assert cli.main(["models", "--workspace", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"imagesieve models: internal error: ValueError: boom{BUG}"
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ValueError]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    assert "Traceback (most recent call last)" in caplog.text


# -- the API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(API base URL, service) of a real server over a workspace without a model."""
    with Service(Workspace(tmp_path_factory.mktemp("errors") / "ws")) as service:
        server = start_server(service, ui=False)
        try:
            yield server.url + "/api/v1", service
        finally:
            server.stop()


def assert_error(r, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": {"status": status, "message": message}}


def test_api__errors_the_library_raises_answer_their_status(served):
    base, _ = served
    r = requests.get(f"{base}/clusters", timeout=30)
    assert r.status_code == 503 and r.json()["error"]["message"].startswith("no trained model in ")
    r = requests.post(f"{base}/sql", json={"sql": "DELETE FROM predictions"}, timeout=30)
    assert_error(r, 400, "only read-only queries (SELECT) are allowed, got DELETE")


@pytest.mark.parametrize(("error", "kind"), LIBRARY_ERRORS)
def test_api__each_library_error_answers_its_kind_s_status(served, monkeypatch, error, kind):
    base, service = served
    monkeypatch.setattr(service, "health", raising(error))
    assert_error(requests.get(f"{base}/health", timeout=30), EXPECTED[kind][0], str(error))


def test_api__full_disk_is_507_in_the_server_s_words(served, monkeypatch):
    base, service = served
    monkeypatch.setattr(service, "health", raising(OSError(errno.ENOSPC, "No space left")))
    assert_error(requests.get(f"{base}/health", timeout=30), 507, DISK_FULL)


def test_api__a_bug_is_500_json_and_its_traceback_is_logged(served, monkeypatch, caplog):
    base, service = served
    monkeypatch.setattr(service, "health", raising(ValueError("boom")))
    with caplog.at_level(logging.ERROR):
        r = requests.get(f"{base}/health", timeout=30)
    assert_error(r, 500, "internal error (ValueError); see the server log")
    assert "boom" not in r.text
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in caplog.records)


# -- the app -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "kind"), LIBRARY_ERRORS)
def test_user_errors__a_library_error_shows_its_message(error, kind):
    import gradio as gr

    from imagesieve.app.ui._widgets import user_errors

    with pytest.raises(gr.Error) as e:
        user_errors(raising(error))()
    assert e.value.message == str(error)


def test_user_errors__a_bug_shows_internal_error_and_logs_its_traceback(caplog):
    import gradio as gr

    from imagesieve.app.ui._widgets import user_errors

    with pytest.raises(gr.Error) as e:
        user_errors(raising(ValueError("boom")))()
    assert e.value.message == "internal error (ValueError); see the server log"
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in caplog.records)
    with pytest.raises(gr.Error) as e:
        user_errors(raising(OSError(errno.ENOSPC, "No space left")))()
    assert e.value.message == DISK_FULL
