"""Option parsing of the bench: the type= parsers, name checks and presets (no pytest run needed)."""

import argparse
import math

import pytest

from bench.config import PRESETS
from bench.options import batch_sizes, byte_size, check_names, clip_norm, comma_list, positive_int, sample_interval


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1e9", 10**9), ("1.5 KiB", 1536), ("100", 100)],
)
def test_byte_size(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8XB", "-1GiB", "0"])
def test_byte_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size(text)


def test_batch_sizes():
    assert batch_sizes("4, 16,1") == (4, 16, 1)
    for bad, message in (("0", ">= 1"), ("-2", ">= 1"), ("x", "not an integer"), (" , ", "empty"), ("4,4", "4 given")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            batch_sizes(bad)


def test_lists_reject_repeats_and_ints_reject_zero():
    with pytest.raises(argparse.ArgumentTypeError, match="bk given more than once"):
        comma_list("bk,nondp,bk")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1, got 0"):
        positive_int("0")


@pytest.mark.parametrize("value", ["0", "-0.001", "2.0", "nan", "inf", "fast"])
def test_sample_interval_rejects(value):
    with pytest.raises(argparse.ArgumentTypeError):
        sample_interval(value)


def test_sample_interval_accepts_sub_millisecond():
    assert sample_interval("0.0005") == 0.0005


def test_clip_norm_says_why_infinity_is_refused():
    assert clip_norm("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="clips nothing"):
        clip_norm("inf")
    for bad in ("0", "-1", math.nan):
        with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
            clip_norm(str(bad))


def test_check_names_lists_close_and_valid_values():
    with pytest.raises(ValueError) as info:
        check_names("--methods", ["bk-tild"], ["nondp", "bk", "bk-tiled"])
    message = str(info.value)
    assert "bk-tiled" in message and "valid:" in message and "\n" not in message


def test_cpu_smoke_preset_is_the_issue_matrix():
    smoke = PRESETS["cpu-smoke"]
    assert smoke.workloads == ("dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny")
    assert smoke.methods is None and len(smoke.batch_sizes) == 2
    assert smoke.precisions == ("fp32", "amp-bf16") and smoke.checkpointings == ("none", "blocks")
    for name in ("gpu-small", "gpu-full"):
        assert "dit-xl-2-cond-512" in PRESETS[name].workloads
        assert PRESETS[name].batch_sizes[0] == 1
        assert PRESETS[name].precisions == ("fp32", "amp-bf16", "bf16")
        assert PRESETS[name].checkpointings == ("none", "blocks")
