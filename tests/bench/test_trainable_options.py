"""``--trainable`` on the command line, in the presets, the planner and the records (no step runs here but the
bad-input ones, which fail before any)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from bench.config.options import trainables
from bench.config.settings import PRESETS, _matrix
from bench.results.record import CaseRecord, MaxBatchRecord, from_jsonl_line, to_jsonl_line


def test_trainables_parse_to_canonical_spellings():
    assert trainables("full, bitfit,lora:r=8:alpha=8") == ("full", "bitfit", "lora:r=8")
    assert trainables("lora:r=8:alpha=16,attention") == ("lora:r=8:alpha=16", "attention")


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora:r=0", "the rank must be >= 1"),
        ("lora:r=x", "unknown trainable 'lora:r=x'"),
        ("adapters", "unknown trainable 'adapters'; valid: full, bitfit, attention or lora:r=R"),
        ("full,full", "given more than once"),
        ("", "empty list"),
    ],
)
def test_bad_trainables_are_one_line_usage_errors(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message) as info:
        trainables(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv", [["bench/", "--trainable", "lora:r=0"], ["-m", "bench.plan", "gpt-tiny", "--trainable", "lora"]]
)
def test_the_command_lines_refuse_a_bad_trainable_in_one_line(argv):
    command = [sys.executable, "-m", "pytest", *argv] if argv[0] == "bench/" else [sys.executable, *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "trainable" in line]
    assert lines and ("rank must be >= 1" in lines[0] or "unknown trainable 'lora'" in lines[0]), done.stderr[-500:]


def test_a_matrix_fine_tunes_where_it_says():
    dimensions = ("workloads", "methods", "batch_sizes", "devices", "precisions", "checkpointings", "trainables")
    given = dict.fromkeys(dimensions) | {"preset": "cpu-smoke"}
    assert _matrix(given).trainables == ("full", "bitfit", "lora:r=8")
    smoke = dataclasses.replace(
        _matrix(given),
        trainables=("full", "bitfit"),
        fine_tuning_modes=(("fp32", "none"),),
        fine_tuning_workloads=("gpt-tiny",),
    )
    assert smoke.includes_mode("gpt-tiny", "fp32", "none", "bitfit")
    assert not smoke.includes_mode("gpt-tiny", "amp-bf16", "blocks", "bitfit")
    assert not smoke.includes_mode("dit-tiny-cond", "fp32", "none", "bitfit")
    assert smoke.includes_mode("dit-tiny-cond", "amp-bf16", "blocks", "full")
    # a run naming its training modes trains full unless it names --trainable too
    assert _matrix(given | {"precisions": ("fp32",)}).trainables == ("full",)
    named = _matrix(given | {"precisions": ("bf16",), "trainables": ("bitfit",)})
    assert named.trainables == ("bitfit",) and named.includes_mode("gpt-tiny", "bf16", "none", "bitfit")
    assert PRESETS["cpu-smoke"].fine_tuning_modes == (("fp32", "none"),)


def test_records_carry_trainable_and_older_ones_read_as_full():
    record = CaseRecord("gpt-tiny", "bk", 4, "cpu", trainable="lora:r=8", params_trainable=4096)
    again = from_jsonl_line(to_jsonl_line(record))
    assert again.trainable == "lora:r=8" and again.params_trainable == 4096
    older = json.loads(to_jsonl_line(record))
    del older["trainable"]
    assert from_jsonl_line(json.dumps(older)).trainable == "full"
    probe = MaxBatchRecord("gpt-tiny", "bk", "meta", trainable="bitfit")
    assert MaxBatchRecord.from_dict(probe.to_dict()).trainable == "bitfit"
