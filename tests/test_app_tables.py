"""Tables in the app show numbers an operator reads: rounded floats, times to the second."""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np

from imagesieve.app.ui._widgets import table_cell, table_frame


def test_table_cell__rounds_floats_and_times_keeps_the_rest():
    assert table_cell(0.8756756756756757) == 0.8757
    assert table_cell(np.float32(0.123456)) == 0.1235
    assert table_cell(float("nan")) is None and table_cell(float("inf")) is None
    assert table_cell(decimal.Decimal("2.50001")) == 2.5
    stamp = dt.datetime(2026, 12, 4, 18, 6, 48, 123456, tzinfo=dt.UTC)
    assert table_cell(stamp) == "2026-12-04 18:06:48"
    assert table_cell(dt.date(2026, 12, 4)) == "2026-12-04"
    assert table_cell(b"\x00\xff") == "\\x00ff"
    assert [table_cell(v) for v in (None, True, 7, "x")] == [None, True, 7, "x"]
    frame = table_frame(["p", "n"], [[0.33333333, 3], [None, 4]])
    assert frame["p"].tolist()[0] == 0.3333 and frame.columns.tolist() == ["p", "n"]
