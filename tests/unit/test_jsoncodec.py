"""The ledger's and the log lines' JSON: orjson, the standard library where orjson refuses."""

from __future__ import annotations

import enum
import json
import math
from datetime import UTC, datetime

from workers import jsoncodec


class Color(enum.Enum):
    RED = "red"


def test_values_round_trip_as_the_standard_library_reads_them() -> None:
    value = {"labels": {"alertname": "Disk", "ünïcode": "✓"}, "n": 3, "x": 1.5, "ok": True, "none": None}
    text = jsoncodec.dumps(value)
    assert json.loads(text) == value
    assert jsoncodec.loads(text) == value
    assert jsoncodec.loads(text.encode()) == value


def test_what_orjson_refuses_goes_through_the_standard_library() -> None:
    big = {"n": 2**70, 1: "key"}  # past 64 bits; a number as a key
    assert json.loads(jsoncodec.dumps(big)) == {"n": 2**70, "1": "key"}
    assert math.isnan(jsoncodec.loads('{"x": NaN}')["x"])
    surrogate = {"s": "\ud800"}
    assert json.loads(jsoncodec.dumps(surrogate)) == surrogate


def test_a_log_line_renders_what_json_cannot_hold_with_the_default() -> None:
    line = jsoncodec.dumps(
        {"event": "x", "when": datetime(2026, 1, 2, tzinfo=UTC), "c": Color.RED, "o": object()}, default=repr
    )
    parsed = json.loads(line)
    assert parsed["when"] == "2026-01-02T00:00:00+00:00" and parsed["c"] == "red"
    assert parsed["o"].startswith("<object object")
