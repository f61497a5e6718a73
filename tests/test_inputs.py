import csv
import io
import socket
import struct
import time
import zipfile
from pathlib import Path

import openpyxl
import pytest
from httpserver import ImageServer  # tests/ is on sys.path under pytest
from PIL import Image

from imagesieve.data import ImageLoadError, load_image
from imagesieve.ingest import _inputs
from imagesieve.ingest._fetch import USER_AGENT, FetchOptions, fetch_items
from imagesieve.ingest._inputs import (
    ArchiveLimits,
    InputError,
    InputItem,
    ZipMember,
    expand_inputs,
)

FAST = FetchOptions(
    workers=4, connect_timeout=1.0, read_timeout=1.0, total_timeout=5.0, backoff=0.01
)


def _image_bytes(color=(200, 30, 30), fmt="PNG", size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


PNG = _image_bytes()
JPEG = _image_bytes((10, 120, 250), "JPEG")


def _write(path: Path, data: bytes | str = PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _names(items) -> list[str]:
    return [item.name for item in items]


def _fetch_one(url: str, opts: FetchOptions = FAST) -> InputItem:
    [item] = fetch_items([InputItem(0, url, None, url=url)], opts)
    return item


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def server():
    with ImageServer({"a.png": PNG, "b.jpg": JPEG, "c d.png": PNG}) as srv:
        yield srv


# --- files and folders -------------------------------------------------------------------------


def test_expand_inputs__folder_recursive_sorted_skipping_hidden(tmp_path):
    root = tmp_path / "photos"
    for rel in ["b.png", "a/z.jpg", "a/sub/y.PNG", ".hidden.png", ".git/x.png", "a/.cache/w.png"]:
        _write(root / rel)
    _write(root / "notes.txt", "hello")
    _write(root / "a" / "README", "no extension")

    expansion = expand_inputs([str(root)])
    items = list(expansion)

    assert _names(items) == [str(root / "a/sub/y.PNG"), str(root / "a/z.jpg"), str(root / "b.png")]
    assert [item.index for item in items] == [0, 1, 2]
    assert all(item.source == item.name and item.error is None for item in items)
    assert [item.filename for item in items] == ["y.PNG", "z.jpg", "b.png"]
    assert expansion.ignored == [
        (str(root / "a/README"), "not an image file extension (none)"),
        (str(root / "notes.txt"), "not an image file extension (.txt)"),
    ]


def test_expand_inputs__files_numbered_across_inputs_any_extension(tmp_path):
    odd = _write(tmp_path / "notes.txt", "named explicitly, so passed on")
    folder = tmp_path / "f"
    _write(folder / "x.png")
    items = list(expand_inputs([str(odd), str(folder), "https://example.com/p/q.jpg"]))
    assert [(i.index, i.name, i.source, i.url) for i in items] == [
        (0, str(odd), str(odd), None),
        (1, str(folder / "x.png"), str(folder / "x.png"), None),
        (2, "https://example.com/p/q.jpg", None, "https://example.com/p/q.jpg"),
    ]


def test_expand_inputs__missing_input_fails_before_any_item(tmp_path):
    _write(tmp_path / "ok.png")
    with pytest.raises(InputError, match=r"^nope\.png: no such file or folder$"):
        expand_inputs([str(tmp_path / "ok.png"), "nope.png"])
    with pytest.raises(InputError, match=r"^ftp://x/y\.png: only http and https URLs are fetched$"):
        expand_inputs(["ftp://x/y.png"])
    xls = _write(tmp_path / "old.xls", b"\xd0\xcf\x11\xe0")
    with pytest.raises(
        InputError, match=r"old\.xls: \.xls lists are not supported; save it as \.xlsx or \.csv"
    ):
        expand_inputs([str(xls)])


def test_input_item__filename():
    def url(u):
        return InputItem(0, u, None, url=u).filename

    assert url("https://h.example/dir/a%20b.png?size=2#x") == "a b.png"
    assert url("https://h.example/") == "image"
    assert url("https://h.example/x/%2E%2E") == "image"
    assert url("https://h.example/a%2Fb%5Cc.jpg") == "c.jpg"
    assert InputItem(0, "z.zip:dir/m.png", b"", member="dir/m.png").filename == "m.png"
    assert InputItem(0, "/data/cat.jpg", "/data/cat.jpg").filename == "cat.jpg"


# --- zip archives ------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("top/", b"")  # a directory entry
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_expand_inputs__zip_members_sorted_with_nested_folders(tmp_path):
    archive = _zip(
        tmp_path / "batch.zip",
        {
            "top/b.png": PNG,
            "a.jpg": JPEG,
            "top/inner/c.png": PNG,
            "top/readme.md": b"# hi",
            "__MACOSX/top/._b.png": b"resource fork",
            "top/.DS_Store": b"junk",
        },
    )
    expansion = expand_inputs([str(archive)])
    items = list(expansion)
    prefix = f"{archive}:"
    assert _names(items) == [prefix + "a.jpg", prefix + "top/b.png", prefix + "top/inner/c.png"]
    assert [i.content() for i in items] == [JPEG, PNG, PNG]  # read when needed, not before
    assert all(isinstance(i.source, ZipMember) for i in items)
    assert [i.filename for i in items] == ["a.jpg", "b.png", "c.png"]
    assert [i.member for i in items] == ["a.jpg", "top/b.png", "top/inner/c.png"]
    assert load_image(items[0].source, name=items[0].name).width == 8
    assert expansion.ignored == [(prefix + "top/readme.md", "not an image file extension (.md)")]


def _patch_central_directory(path: Path, member: str, *, flag_bits=None, file_size=None) -> None:
    """Rewrite one central-directory field of ``member`` in place (what zipfile cannot write)."""
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x01\x02")  # the first central-directory entry
    while True:
        name_len = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + name_len].decode() == member:
            break
        extra, comment = struct.unpack_from("<HH", data, start + 30)
        start += 46 + name_len + extra + comment
    if flag_bits is not None:
        struct.pack_into("<H", data, start + 8, flag_bits)
    if file_size is not None:
        struct.pack_into("<I", data, start + 24, file_size)
    path.write_bytes(bytes(data))


def test_expand_inputs__zip_bombs_and_bad_members_become_error_items(tmp_path, monkeypatch):
    monkeypatch.setattr(_inputs, "MAX_MEMBER_BYTES", 1000)
    archive = _zip(
        tmp_path / "bad.zip",
        {
            "declared.png": b"\x00" * 5000,  # declares 5,000 bytes
            "liar.png": b"\x00" * 5000,  # will declare 500 bytes but inflate to 5,000
            "locked.png": PNG,
            "ok.png": PNG[:900],
        },
    )
    _patch_central_directory(archive, "liar.png", file_size=500)
    _patch_central_directory(archive, "locked.png", flag_bits=0x1)
    assert len(PNG) < 1000

    items = {i.member: i for i in expand_inputs([str(archive)])}

    declared = items["declared.png"].error
    assert (declared.kind, declared.source) == ("too_large", f"{archive}:declared.png")
    assert declared.reason == "zip member is 5,000 bytes, over the 1,000-byte limit"
    liar = items["liar.png"]  # found out when it is read
    with pytest.raises(ImageLoadError) as err:
        liar.content()
    assert err.value.kind == "corrupt" and err.value.reason.startswith("corrupt zip member (")
    assert (items["locked.png"].error.kind, items["locked.png"].error.reason) == (
        "unreadable",
        "zip member is encrypted (password protected)",
    )
    assert items["ok.png"].content() == PNG[:900] and items["ok.png"].error is None


def test_expand_inputs__zip_member_with_corrupt_data(tmp_path):
    big = _image_bytes(size=(300, 300))
    archive = _zip(tmp_path / "c.zip", {"x.png": big})
    data = bytearray(archive.read_bytes())
    offset = data.index(b"x.png") + len("x.png") + 20  # inside the deflated stream
    data[offset : offset + 16] = b"\xff" * 16
    archive.write_bytes(bytes(data))
    [item] = expand_inputs([str(archive)])
    with pytest.raises(ImageLoadError) as err:
        load_image(item.source, name=item.name)
    assert err.value.kind == "corrupt"
    assert str(err.value).startswith(f"{archive}:x.png: corrupt zip member (")


def test_expand_inputs__unsafe_member_names_are_failures_not_dropped(tmp_path):
    archive = _zip(tmp_path / "evil.zip", {"../../x.png": PNG, "/abs.png": PNG, "ok/../y.png": PNG})
    items = {i.member: i for i in expand_inputs([str(archive)])}
    assert set(items) == {"../../x.png", "/abs.png", "ok/../y.png"}
    for item in items.values():
        assert item.source is None and item.error.kind == "unreadable"
        assert item.error.reason == "unsafe member name (absolute or with ..)"


def test_expand_inputs__zip_members_are_streamed_one_at_a_time_within_budgets(tmp_path):
    big = b"\x00" * 2_000_000  # deflates to ~2 KB
    archive = _zip(tmp_path / "bomb.zip", {f"m{i:02}.png": big for i in range(12)})
    assert archive.stat().st_size < 100_000
    limits = ArchiveLimits(max_bytes=5_000_000, max_total_members=10)
    items = list(expand_inputs([str(archive)], archives=limits))
    assert len(items) == 11  # ten members, then one failure for the rest
    assert all(isinstance(i.source, ZipMember) for i in items[:10])  # nothing read yet
    assert items[10].error.kind == "too_large" and items[10].name == str(archive)
    assert items[10].error.reason == (
        f"over the limit of 10 image members per run; 2 image members of {archive} were not read"
    )
    read = [i.content() for i in items[:2]]  # 4,000,000 bytes inflated
    assert read == [big, big]
    with pytest.raises(ImageLoadError, match="over the limit of 5,000,000 inflated bytes per "):
        items[2].content()  # would pass 5,000,000 for this archive


def test_expand_inputs__member_count_per_archive(tmp_path):
    archive = _zip(tmp_path / "many.zip", {f"{i}.png": PNG for i in range(30)})
    items = list(expand_inputs([str(archive)], archives=ArchiveLimits(max_members=25)))
    assert len(items) == 26 and items[-1].error.reason.startswith(
        f"over the limit of 25 image members per archive; 5 image members of {archive}"
    )


def test_expand_inputs__corrupt_zip_is_an_input_error(tmp_path):
    archive = _write(tmp_path / "broken.zip", b"PK\x03\x04 this is not really a zip")
    with pytest.raises(
        InputError, match=r"broken\.zip: not a readable zip archive \(File is not a zip file\)"
    ):
        expand_inputs([str(archive)])


# --- CSV and XLSX lists ------------------------------------------------------------------------


def _csv(path: Path, rows: list[list[str]], delimiter=",", encoding="utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def test_expand_inputs__csv_rows_become_items(tmp_path):
    img = _write(tmp_path / "imgs" / "cat.png")
    elsewhere = _write(tmp_path / "elsewhere" / "dog.jpg", JPEG)
    listing = _csv(
        tmp_path / "photos.csv",
        [
            ["id", "URL", "note"],
            ["1", " https://example.com/a.png ", "url, whitespace stripped"],
            ["2", "imgs/cat.png", "relative to the list"],
            ["3", str(elsewhere), "absolute"],
            ["4", "imgs/missing.png", ""],
            ["5", "ftp://example.com/b.png", ""],
            ["6", "", "empty cell"],
            [],
            ["", "", ""],
            ["8", "HTTP://EXAMPLE.COM/C.PNG", "upper-case scheme"],
            ["9", "javascript:alert(1)", ""],
        ],
    )
    items = list(expand_inputs([str(listing)]))
    got = [(i.index, i.name, i.source, i.url, i.error and i.error.kind) for i in items]
    missing = str(tmp_path / "imgs" / "missing.png")
    assert got == [
        (0, "https://example.com/a.png", None, "https://example.com/a.png", None),
        (1, str(img), str(img), None, None),
        (2, str(elsewhere), str(elsewhere), None, None),
        (3, missing, None, None, "missing"),
        (4, "ftp://example.com/b.png", None, None, "bad_url"),
        (5, str(listing), None, None, "empty"),
        (6, "HTTP://EXAMPLE.COM/C.PNG", None, "HTTP://EXAMPLE.COM/C.PNG", None),
        (7, "javascript:alert(1)", None, None, "bad_url"),
    ]
    assert str(items[3].error) == f"{missing}: file not found (photos.csv row 5)"
    assert str(items[4].error) == (
        "ftp://example.com/b.png: only http and https URLs are fetched (photos.csv row 6)"
    )
    assert str(items[5].error) == f"{listing}: row 7: empty cell in column 'URL'"


def test_expand_inputs__served_list_names_no_local_paths(tmp_path):
    upload = tmp_path / "upload"
    _write(upload / "own.png")
    secret = _write(tmp_path / "secret" / "key.png")
    (upload / "link.png").symlink_to(secret)
    cells = [
        str(secret),
        "../secret/key.png",
        "/etc/passwd",
        "link.png",
        "/nope/x.png",
        "/dev/zero",
    ]
    listing = _csv(
        upload / "list.csv", [["path"], ["own.png"], ["~/.bashrc"], *[[c] for c in cells]]
    )
    items = list(expand_inputs([str(listing)], local_paths=[upload]))
    assert items[0].source == str(upload / "own.png") and items[0].error is None
    refused = "local paths are not read from this list, only http(s) URLs (list.csv row {})"
    for n, item in enumerate(items[1:], start=3):  # "~/.bashrc" too
        assert item.source is None and item.error.kind == "not_allowed", item
        assert item.error.reason == refused.format(n)  # the same whether the file exists or not
    nothing = list(expand_inputs([str(listing)], local_paths=[]))
    assert {i.error.kind for i in nothing} == {"not_allowed"}


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (None, "column named url, image_url, image, path, file, filename, source"),
        ("pic", "column 'pic'"),
    ],
)
def test_expand_inputs__csv_without_the_column(tmp_path, column, message):
    listing = _csv(tmp_path / "photos.csv", [["id", "link", "note"], ["1", "a.png", ""]])
    expected = f"{listing} has no {message}; columns: id, link, note (choose one with --column)"
    with pytest.raises(InputError) as info:
        expand_inputs([str(listing)], column=column)
    assert str(info.value) == expected


def test_expand_inputs__column_is_case_insensitive(tmp_path):
    _write(tmp_path / "a.png")
    listing = _csv(tmp_path / "l.csv", [["id", "Link", "path"], ["1", "a.png", "ignored.png"]])
    [item] = expand_inputs([str(listing)], column="LINK")
    assert item.name == str(tmp_path / "a.png") and item.error is None


def test_expand_inputs__auto_detect_takes_the_first_known_header(tmp_path):
    listing = _csv(
        tmp_path / "l.csv",
        [["File", "note", "Image_URL"], ["nope.png", "", "https://example.com/x.png"]],
    )
    [item] = expand_inputs([str(listing)])
    assert item.url == "https://example.com/x.png"  # image_url comes before file in the list


@pytest.mark.parametrize(("delimiter", "suffix"), [(";", ".csv"), ("\t", ".csv"), ("\t", ".tsv")])
def test_expand_inputs__csv_delimiter_and_bom(tmp_path, delimiter, suffix):
    _write(tmp_path / "é.png")
    rows = [
        ["name", "Path"],
        ["first, with a comma", "é.png"],
        ["second", "https://h.example/b.png"],
    ]
    listing = _csv(tmp_path / f"l{suffix}", rows, delimiter, encoding="utf-8-sig")
    assert listing.read_bytes().startswith(b"\xef\xbb\xbf")
    items = list(expand_inputs([str(listing)]))
    assert [(i.name, i.error) for i in items] == [
        (str(tmp_path / "é.png"), None),
        ("https://h.example/b.png", None),
    ]


def test_expand_inputs__csv_in_cp1252(tmp_path):
    _write(tmp_path / "café.png")
    listing = _csv(tmp_path / "l.csv", [["file"], ["café.png"]], encoding="cp1252")
    [item] = expand_inputs([str(listing)])
    assert item.name == str(tmp_path / "café.png") and item.error is None


def test_expand_inputs__headerless_url_list(tmp_path):
    listing = _write(tmp_path / "urls.csv", "https://h.example/1.png\nhttps://h.example/2.png\n")
    assert _names(expand_inputs([str(listing)])) == [
        "https://h.example/1.png",
        "https://h.example/2.png",
    ]


def test_expand_inputs__empty_csv(tmp_path):
    listing = _write(tmp_path / "e.csv", "\n\n")
    with pytest.raises(
        InputError, match=r"e\.csv is empty: expected a header row naming the image column"
    ):
        expand_inputs([str(listing)])


def _xlsx(path: Path, rows: list[list]) -> Path:
    wb = openpyxl.Workbook()
    ws = wb.active
    for row in rows:
        ws.append(row)
    wb.create_sheet("second").append(["url"])  # only the first sheet is read
    wb.save(path)
    return path


def test_expand_inputs__xlsx_rows_become_items(tmp_path):
    img = _write(tmp_path / "pics" / "7.png")
    book = _xlsx(
        tmp_path / "batch.xlsx",
        [
            ["Site", "Image"],
            ["a", "https://h.example/a.png"],
            ["b", None],
            ["c", "pics/7.png"],
            [None, None],
            ["d", "file:///etc/passwd"],
        ],
    )
    items = list(expand_inputs([str(book)]))
    assert [(i.name, i.url, i.error and i.error.kind) for i in items] == [
        ("https://h.example/a.png", "https://h.example/a.png", None),
        (str(book), None, "empty"),
        (str(img), None, None),
        ("file:///etc/passwd", None, "bad_url"),
    ]
    assert items[1].error.reason == "row 3: empty cell in column 'Image'"
    assert items[3].error.reason == "only http and https URLs are fetched (batch.xlsx row 6)"


def test_expand_inputs__xlsx_column_choice_and_errors(tmp_path):
    book = _xlsx(tmp_path / "b.xlsx", [["id", "Link"], [1, "https://h.example/1.png"], [2, 17]])
    with pytest.raises(InputError) as info:
        expand_inputs([str(book)])
    assert str(info.value) == (
        f"{book} has no column named url, image_url, image, path, file, filename, source; "
        "columns: id, Link (choose one with --column)"
    )
    items = list(expand_inputs([str(book)], column="link"))
    assert _names(items) == ["https://h.example/1.png", str(tmp_path / "17")]
    assert items[1].error.kind == "missing"

    garbage = _write(tmp_path / "bad.xlsx", b"not a spreadsheet at all")
    with pytest.raises(InputError, match=r"bad\.xlsx: cannot read the spreadsheet \("):
        expand_inputs([str(garbage)])


# --- fetching ----------------------------------------------------------------------------------


def test_fetch_items__image_and_pass_through(server, tmp_path):
    local = InputItem(0, "x.png", "x.png")
    failed = InputItem(
        1, "gone.png", None, error=ImageLoadError("gone.png", "missing", "file not found")
    )
    url = server.url("c d.png")
    items = list(fetch_items([local, failed, InputItem(2, url, None, url=url)], FAST))
    assert items[:2] == [local, failed]
    fetched = items[2]
    assert (fetched.index, fetched.name, fetched.url, fetched.error) == (2, url, url, None)
    assert fetched.source == PNG and fetched.filename == "c d.png"


@pytest.mark.parametrize(
    ("path", "kind", "reason"),
    [
        ("/status/404", "http_error", "HTTP 404 Not Found"),
        ("/status/403", "http_error", "HTTP 403 Forbidden"),
        ("/html", "not_image", "server returned text/html, not an image"),
        ("/empty", "empty", "server returned an empty body"),
        ("/big", "too_large", "10,737,418,240 bytes, over the 1,000,000-byte limit"),
        ("/big-chunked", "too_large", "body is over the 1,000,000-byte limit"),
        ("/redirect-loop", "redirects", "more than 3 redirects"),
        (
            "/redirect-ftp",
            "bad_url",
            "redirected to ftp://127.0.0.1/x.png: only http and https URLs are fetched",
        ),
    ],
)
def test_fetch_items__failures(server, path, kind, reason):
    opts = FetchOptions(
        workers=2, read_timeout=2.0, max_bytes=1_000_000, max_redirects=3, backoff=0.01
    )
    url = server.base + path
    before = server.hits[path]
    item = _fetch_one(url, opts)
    assert item.source is None
    assert (item.error.source, item.error.kind, item.error.reason) == (url, kind, reason)
    assert server.hits[path] - before == (4 if path == "/redirect-loop" else 1)  # no retries


def test_fetch_items__redirect_followed(server):
    item = _fetch_one(server.base + "/redirect/b.jpg")
    assert item.source == JPEG and item.error is None
    assert server.hits["/redirect/b.jpg"] == 1 and server.hits["/img/b.jpg"] >= 1


def test_fetch_items__retries_server_errors(server):
    item = _fetch_one(server.base + "/flaky/a.png")
    assert item.source == PNG and server.hits["/flaky/a.png"] == 2

    item = _fetch_one(server.base + "/status/503")
    assert item.error.kind == "http_error"
    assert item.error.reason == "HTTP 503 Service Unavailable (after 3 attempts)"
    assert server.hits["/status/503"] == 3

    start = time.monotonic()
    item = _fetch_one(
        server.base + "/status/429?retry_after=0.3", FetchOptions(retries=1, backoff=5)
    )
    assert item.error.reason == "HTTP 429 Too Many Requests (after 2 attempts)"
    assert server.hits["/status/429"] == 2
    assert 0.3 <= time.monotonic() - start < 2  # waited Retry-After, not the 5 s backoff


def test_fetch_items__read_timeout(server):
    opts = FetchOptions(read_timeout=0.3, retries=1, backoff=0.01)
    start = time.monotonic()
    item = _fetch_one(server.base + "/slow/3", opts)
    assert (item.error.kind, item.error.reason) == (
        "timeout",
        "server sent no data for 0.3 s (after 2 attempts)",
    )
    assert server.hits["/slow/3"] == 2
    assert time.monotonic() - start < 1.5


def test_fetch_items__total_timeout_stops_a_drip_feed(server):
    opts = FetchOptions(read_timeout=2.0, total_timeout=1.2, retries=2)
    start = time.monotonic()
    item = _fetch_one(server.base + "/drip", opts)
    assert (item.error.kind, item.error.reason) == (
        "timeout",
        "download took over 1.2 s (total timeout)",
    )
    assert server.hits["/drip"] == 1  # the deadline covers retries too
    assert time.monotonic() - start < 2.5


def test_fetch_items__connection_refused_and_bad_urls():
    url = f"http://127.0.0.1:{_closed_port()}/a.png"
    item = _fetch_one(url, FetchOptions(retries=1, backoff=0.01))
    assert (item.error.kind, item.error.reason) == (
        "connection",
        "connection refused (after 2 attempts)",
    )
    for bad, reason in [
        ("ftp://h.example/a.png", "only http and https URLs are fetched"),
        ("http:///a.png", "malformed URL (no host)"),
        ("http://h.example:99999/a.png", "malformed URL (Port out of range 0-65535)"),
    ]:
        item = _fetch_one(bad)
        assert (item.error.source, item.error.kind, item.error.reason) == (bad, "bad_url", reason)


def test_fetch_items__unknown_host(monkeypatch):
    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    item = _fetch_one("http://no-such-host.example/a.png", FetchOptions(retries=0))
    assert (item.error.kind, item.error.reason) == (
        "connection",
        "cannot resolve host no-such-host.example",
    )


def test_fetch_items__sends_user_agent(server, monkeypatch):
    seen = []
    import requests

    original = requests.Session.send

    def spy(self, request, **kwargs):
        seen.append(request.headers["User-Agent"])
        return original(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", spy)
    assert _fetch_one(server.url("a.png")).error is None
    assert seen == [USER_AGENT] and USER_AGENT.startswith("imagesieve/")


def test_fetch_items__every_item_once_with_its_index(server, tmp_path):
    listing = _csv(
        tmp_path / "mixed.csv",
        [["url"]]
        + [[server.url(name)] for name in ["a.png", "b.jpg", "c d.png", "zz.png"] * 5]
        + [["nope.png"], [server.base + "/html"], ["ftp://x/y.png"]],
    )
    expected = list(expand_inputs([str(listing)]))
    got = list(fetch_items(expand_inputs([str(listing)]), FAST))
    assert sorted(i.index for i in got) == list(range(len(expected))) == list(range(23))
    by_index = {i.index: i for i in got}
    for want in expected:
        item = by_index[want.index]
        assert item.name == want.name
        if want.url and want.url.endswith("zz.png"):
            assert item.error.reason == "HTTP 404 Not Found"
        elif want.url and "/img/" in want.url:
            assert isinstance(item.source, bytes) and item.error is None
    assert sum(i.error is None for i in got) == 15


def test_fetch_items__concurrent():
    files = {f"{n}.png": PNG for n in range(200)}
    with ImageServer(files, latency=0.05) as srv:
        items = [
            InputItem(n, srv.url(f"{n}.png"), None, url=srv.url(f"{n}.png")) for n in range(200)
        ]
        start = time.monotonic()
        got = list(fetch_items(items, FetchOptions(workers=16)))
        elapsed = time.monotonic() - start
    assert sorted(i.index for i in got) == list(range(200))
    assert all(i.source == PNG for i in got)
    assert elapsed < 3.0, f"200 x 50 ms took {elapsed:.2f} s with 16 workers"


def test_fetch_items__consumes_lazily_and_closes_without_waiting(server):
    pulled = 0

    def stream():
        nonlocal pulled
        for n in range(10_000):
            pulled += 1
            url = server.base + f"/slow/5?n={n}"
            yield InputItem(n, url, None, url=url)

    opts = FetchOptions(workers=2, read_timeout=1.0, retries=0)
    results = fetch_items(stream(), opts)
    start = time.monotonic()
    first = next(results)  # read timeout after ~1 s
    assert first.error.kind == "timeout"
    assert pulled <= 2 * opts.workers + 1
    results.close()
    assert time.monotonic() - start < 2.0


def test_fetch_options__rejects_bad_values():
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        FetchOptions(workers=0)
    with pytest.raises(ValueError, match="total_timeout must be positive, got 0"):
        FetchOptions(total_timeout=0)
    with pytest.raises(ValueError, match="retries must not be negative, got -1"):
        FetchOptions(retries=-1)


# --- what a server's lists may reach ----------------------------------------------------------

SERVED = FetchOptions(private_networks=False, retries=0)


def _fetched(urls, opts):
    return {
        i.url: i
        for i in fetch_items([InputItem(n, u, None, url=u) for n, u in enumerate(urls)], opts)
    }


def test_fetch_items__served_lists_reach_no_internal_address():
    with ImageServer({"a.png": PNG}) as server:
        _no_internal_address(server)


def _no_internal_address(server):
    port = server.base.rsplit(":", 1)[1]
    urls = [
        server.url("a.png"),
        f"http://localhost:{port}/img/a.png",
        f"http://2130706433:{port}/img/a.png",  # 127.0.0.1 as one number
        f"http://0x7f.1:{port}/img/a.png",
        f"http://[::1]:{port}/img/a.png",
        f"http://[::ffff:127.0.0.1]:{port}/img/a.png",
        f"http://0.0.0.0:{port}/img/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://[fe80::1]/x.png",
        "http://224.0.0.1/x.png",
    ]
    got = _fetched(urls, SERVED)
    for url in urls:
        err = got[url].error
        assert err is not None and err.kind == "not_allowed", (url, got[url])
        assert err.reason.endswith(
            "is not a public address: only public http(s) URLs are fetched here"
        )
    assert sum(server.hits.values()) == 0  # no request reached it


def test_fetch_items__redirects_are_checked_on_every_hop(tmp_path):
    with (
        ImageServer({"a.png": PNG}) as inside,
        ImageServer({"a.png": PNG}, host="127.0.0.2") as edge,
    ):
        opts = FetchOptions(private_networks=False, allow_networks=("127.0.0.2/32",), retries=0)
        allowed = edge.url("a.png")
        hop = f"{edge.base}/redirect-to?url={inside.url('a.png')}"
        got = _fetched([allowed, hop], opts)
        assert got[allowed].source == PNG  # the operator allowed this one network
        err = got[hop].error
        assert err.kind == "not_allowed"
        assert err.reason.startswith(
            f"redirected to {inside.url('a.png')}: 127.0.0.1 is not a public"
        )
        assert sum(inside.hits.values()) == 0


def test_fetch_items__connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address, then to loopback."""
    import socket

    with (
        ImageServer({"a.png": PNG}, host="127.0.0.2") as allowed,
        ImageServer({"a.png": PNG}) as inside,
    ):
        port = int(allowed.base.rsplit(":", 1)[1])
        real = socket.getaddrinfo
        answers = iter(["127.0.0.2", "127.0.0.1", "127.0.0.1"])

        def rebinding(host, *args, **kwargs):
            if host == "rebind.test":
                return real(next(answers), *args, **kwargs)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        opts = FetchOptions(private_networks=False, allow_networks=("127.0.0.2/32",), retries=0)
        url = f"http://rebind.test:{port}/img/a.png"
        assert _fetched([url], opts)[url].source == PNG
        assert allowed.hits["/img/a.png"] == 1 and sum(inside.hits.values()) == 0


def test_fetch_options__allow_networks_must_be_cidrs():
    with pytest.raises(ValueError, match="not a network \\(CIDR like 10.0.0.0/8\\): 'intranet'"):
        FetchOptions(allow_networks=("intranet",))
