"""Entry ids as people type them (shitu/ids.py): every front end reads ids through parse_ids."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from shitu.errors import ShiTuError, TooLarge
from shitu.ids import MAX_ID, MAX_IDS, parse_ids, read_id_file


@pytest.mark.parametrize(
    "value, expected",
    [
        ("3, 7 12 192-197", [3, 7, 12, 192, 193, 194, 195, 196, 197]),
        ("5 3-6 4", [5, 3, 4, 6]),  # first given first, each once
        ([2, np.int64(4), 4.0], [2, 4]),
        (7, [7]),
        (f"{MAX_ID}", [MAX_ID]),
        (" 0-2 ,, 1 ", [0, 1, 2]),
    ],
)  # fmt: skip
def test_ids_and_ranges(value, expected):
    assert parse_ids(value) == expected


@pytest.mark.parametrize(
    "value, error, message",
    [
        (str(1 << 63), ShiTuError, r"from 0 to 2\^63-1"),
        (1 << 64, ShiTuError, r"from 0 to 2\^63-1"),
        ("-5", ShiTuError, "not an entry id"),
        ("3-1", ShiTuError, "not a usable id range"),
        ("x", ShiTuError, "'x' is not an entry id"),
        ("١٢", ShiTuError, "not an entry id"),  # digits of another script are not ids here
        ([True], ShiTuError, "not an entry id"),
        ([2.5], ShiTuError, "not an entry id"),
        ("", ShiTuError, "no ids were given"),
        (f"0-{MAX_IDS}", TooLarge, f"at most {MAX_IDS:,}"),
        pytest.param("1 " * (1 << 20), TooLarge, "longer than", id="2 MB of text"),
        ({"a": 1}, ShiTuError, "not a list of entry ids"),
    ],
)  # fmt: skip
def test_bad_ids_are_refused_with_a_message(value, error, message):
    with pytest.raises(error, match=message):
        parse_ids(value)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_repeated_ranges_are_merged_not_listed():
    """A few KB of ``0-100000`` repeated once cost +1 GB and seconds (each range became a list
    before duplicates were dropped); here 2,000 ranges of 2,001 ids would be 4M list items."""
    text = "0-2000 " * 2000
    tracemalloc.start()
    try:
        ids = parse_ids(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids == list(range(2_001))
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB"


def test_an_id_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# two and a range\n4\n1-2 trailing words\n\n", encoding="utf-8")
    assert read_id_file(path) == [4, 1, 2]
