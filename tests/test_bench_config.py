"""Option parsing of the bench: sizes, lists, intervals, presets."""

import math

import pytest

from bench.config import (
    PRESETS,
    BenchUsageError,
    check_names,
    check_sample_interval,
    parse_batch_sizes,
    parse_bytes,
    split_list,
)


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1e9", 10**9), ("1.5 KiB", 1536), ("100", 100)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes("--memory-cap", text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8XB", "-1GiB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(BenchUsageError, match="--memory-cap"):
        parse_bytes("--memory-cap", text)


def test_batch_sizes():
    assert parse_batch_sizes("4, 16,1") == [4, 16, 1]
    for bad in ("0", "-2", "x", " , "):
        with pytest.raises(BenchUsageError, match="--batch-sizes"):
            parse_batch_sizes(bad)


@pytest.mark.parametrize("value", [0, -0.001, 2.0, math.nan, math.inf])
def test_sample_interval_rejects(value):
    with pytest.raises(BenchUsageError, match="--sample-interval"):
        check_sample_interval(value)


def test_sample_interval_accepts_sub_millisecond():
    assert check_sample_interval(0.0005) == 0.0005


def test_check_names_lists_close_and_valid_values():
    with pytest.raises(BenchUsageError) as info:
        check_names("--methods", ["bk-tild"], ["nondp", "bk", "bk-tiled"])
    message = str(info.value)
    assert "bk-tiled" in message and "valid:" in message and "\n" not in message
    assert split_list("--x", None) is None


def test_cpu_smoke_preset_is_the_issue_matrix():
    smoke = PRESETS["cpu-smoke"]
    assert smoke.workloads == ("dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny")
    assert smoke.methods is None and len(smoke.batch_sizes) == 2
    for name in ("gpu-small", "gpu-full"):
        assert "dit-xl-2-cond-512" in PRESETS[name].workloads
        assert PRESETS[name].batch_sizes[0] == 1
