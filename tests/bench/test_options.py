"""Option parsing of the bench: the type= parsers, name checks and presets (no pytest run needed)."""

import argparse
import math
import re

import pytest

from bench.config.options import (
    batch_sizes,
    byte_size,
    check_names,
    clip_norm,
    comma_list,
    positive_int,
    sample_interval,
    seed,
)
from bench.config.settings import PRESETS
from bench.plan.overhead import parse_overhead


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * 2**30),
        ("512MB", 512 * 10**6),
        ("1e9B", 10**9),
        ("1E9B", 10**9),
        ("1e+9b", 10**9),
        ("1.5 KiB", 1536),
        ("100B", 100),
        ("9223372036854775807B", 2**63 - 1),  # exact, not through a float
    ],
)
def test_byte_size(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is not a size"),
        ("lots", "is not a size"),
        ("8XB", "is not a size"),
        ("-1GiB", "is not a size"),
        ("0", ">= 1 byte"),
        ("0.5B", ">= 1 byte"),
        ("1e-400GiB", ">= 1 byte"),
        ("80", "'80' has no unit: write 80GiB, 80GB or 80B"),  # it used to mean 80 bytes
        ("1e9", "has no unit"),
        ("1E9", "has no unit"),
        ("1e400B", "too large"),  # it used to be "< 1 byte"
        ("1e999999999GiB", "too large"),  # refused at once, never an exact 10**999999999
        ("9223372036854775808B", "too large"),
    ],
)
def test_byte_size_rejects_in_one_line(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)) as info:
        byte_size(text)
    assert "\n" not in str(info.value)


def test_the_overhead_takes_sizes_as_the_size_options_do():
    assert parse_overhead("1E9B+5%").fixed_bytes == byte_size("1E9B") == 10**9
    assert parse_overhead("1e+9B+5%").fixed_bytes == 10**9  # the last '+' separates the percentage
    assert parse_overhead("0+0%").fixed_bytes == 0  # zero needs no unit
    for bad, message in (("512+5%", "has no unit"), ("1e400B+5%", "too large"), ("0.5B+1%", "0 or >= 1 byte")):
        with pytest.raises(ValueError, match=message):
            parse_overhead(bad)


def test_seed_takes_what_the_generators_take():
    assert seed("0") == 0 and seed(str(2**64 - 2)) == 2**64 - 2
    for bad in ("-1", str(2**64 - 1), "9" * 23, "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            seed(bad)


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
