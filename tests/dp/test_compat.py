"""`python -m bench.dp`: the compatibility matrix CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.dp.__main__ import DEFAULT_WORKLOADS, main, render_matrix

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_matrix_on_tied_and_untied_gpt(capsys):
    assert (
        main(["--workloads", "gpt-tiny,gpt-tiny:tie_weights=False", "--methods", "opacus-ghost,torch-func,nondp"]) == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "| workload | `opacus-ghost` | `torch-func` | `nondp` |"
    assert lines[2] == "| `gpt-tiny` | unsupported [1] | ok | ok |"
    assert lines[3] == "| `gpt-tiny:tie_weights=False` | ok | ok | ok |"
    assert (
        "1. `opacus-ghost` × `gpt-tiny`: NotImplementedError: Parameter tying is not supported with Ghost Clipping"
        in out
    )


def test_matrix_shows_the_learnable_pos_embed_failures(capsys):
    assert main(["--workloads", "dit-tiny-cond:learnable_pos_embed=True", "--methods", "opacus-hooks,torch-func"]) == 0
    out = capsys.readouterr().out
    assert "| `dit-tiny-cond:learnable_pos_embed=True` | unsupported [1] | ok |" in out
    assert "missing 2 required positional arguments: 't' and 'y'" in out and "'pos_embed'" in out


def test_the_default_matrix_covers_every_tiny_workload():
    from models.catalog import TINY_WORKLOADS

    assert set(TINY_WORKLOADS) <= set(DEFAULT_WORKLOADS)


def test_render_marks_mismatches_and_numbers_notes():
    rows = [
        ("w", "a", "ok", None),
        ("w", "b", "unsupported", "E: x — y"),
        ("v", "a", "MISMATCH (rel. err 1e-2)", None),
        ("v", "b", "unsupported", "E: z"),
    ]
    text = render_matrix(rows, ["w", "v"], ["a", "b"])
    assert "| `w` | ok | unsupported [1] |" in text and "| `v` | MISMATCH (rel. err 1e-2) | unsupported [2] |" in text
    assert text.endswith("1. `b` × `w`: E: x — y\n2. `b` × `v`: E: z")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "opacus-hoks"], "unknown DP method 'opacus-hoks'"),
        (["--workloads", "gpt-tinyy"], "unknown workload 'gpt-tinyy'"),
        (["--workloads", "gpt-tiny:tie_weights"], "bad override"),
        (["--workloads", "gpt-tiny:colour=1"], "takes no override 'colour'; valid keys"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
    ],
)
def test_bad_names_are_one_line_errors_with_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_module_entry_point_exits_2_on_unknown_method():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dp", "--methods", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2 and "unknown DP method 'nope'" in proc.stderr and proc.stdout == ""
