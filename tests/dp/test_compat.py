"""`python -m bench.dp`: the compatibility matrix CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.dp import available_methods
from bench.dp.__main__ import DEFAULT_WORKLOADS, main, render_matrix, render_mode_matrix
from bench.dp.modes import TrainingMode

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


def test_the_matrix_has_the_jax_columns(capsys):
    pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
    pytest.importorskip("jax_privacy", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
    methods = "jax-vmap,jax-privacy,jax-privacy:microbatch=2,jax-privacy:microbatch=3"
    assert main(["--workloads", "gpt-tiny-untied", "--methods", methods]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert (
        lines[0]
        == "| workload | `jax-vmap` | `jax-privacy` | `jax-privacy:microbatch=2` | `jax-privacy:microbatch=3` |"
    )
    assert lines[2] == "| `gpt-tiny-untied` | ok | ok | ok | unsupported [1] |"
    assert "1. `jax-privacy:microbatch=3` × `gpt-tiny-untied`: microbatch size 3 does not divide batch size 4" in out


def test_without_jax_the_default_matrix_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError, as without the extra
    assert main(["--workloads", "gpt-tiny-untied"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    columns = [c.strip(" `") for c in header.strip("|").split("|")][1:]
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|")[1:])))
    assert columns == available_methods(include_opt_in=True)
    assert set(columns) - set(available_methods()) == {"jax-vmap", "jax-privacy"}
    assert cells["bk"] == "ok" and cells["jax-vmap"].startswith("unsupported [")
    notes = [line for line in out.splitlines() if "`jax-" in line and " × " in line]
    assert len(notes) == 2 and all("pip install 'dpmem[jax]'" in line for line in notes)


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


def test_mode_matrix_shows_what_runs_and_why_the_rest_is_refused(capsys):
    argv = ["--modes", "fp32+blocks,amp-bf16", "--workloads", "gpt-tiny-untied", "--methods", "bk,torch-func,opacus-ew"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "`gpt-tiny-untied`" and lines[2] == "| method | `fp32+blocks` | `amp-bf16` |"
    assert lines[4].startswith("| `bk` | ok (") and lines[4].count("ok (") == 2
    assert lines[5].startswith("| `torch-func` | unsupported [1] | ok (")
    assert lines[6] == "| `opacus-ew` | unsupported [2] | unsupported [3] |"
    assert "1. `torch-func`: RuntimeError: torch.func" in out and "saved tensor hooks" in out
    assert "2. `opacus-ew`: CheckpointError:" in out
    assert "3. `opacus-ew`: RuntimeError: expected m1 and m2 to have the same dtype" in out and "bf16 and a fp32" in out


def test_render_mode_matrix_numbers_a_repeated_refusal_once():
    modes = [TrainingMode(), TrainingMode("amp-fp16")]
    rows = [
        ("w", "a", "fp32", "ok (1e-07)", None),
        ("w", "a", "amp-fp16", "unsupported", "E: no scaler"),
        ("w", "b", "fp32", "MISMATCH (3e-01)", None),
        ("w", "b", "amp-fp16", "unsupported", "E: no scaler"),
    ]
    text = render_mode_matrix(rows, ["w"], ["a", "b"], modes)
    assert "| `a` | ok (1e-07) | unsupported [1] |" in text and "| `b` | MISMATCH (3e-01) | unsupported [1] |" in text
    assert text.endswith("1. `a`, `b`: E: no scaler")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "opacus-hoks"], "unknown DP method 'opacus-hoks'"),
        (["--workloads", "gpt-tinyy"], "unknown workload 'gpt-tinyy'"),
        (["--workloads", "gpt-tiny:tie_weights"], "bad override"),
        (["--workloads", "gpt-tiny:colour=1"], "takes no override 'colour'; valid keys"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--methods", "jax-privacy:microbatch=0"], "jax-privacy': microbatch must be an integer >= 1, got '0'"),
        (["--methods", "bk:microbatch=2"], "DP method 'bk' takes no options, got 'microbatch=2'"),
        (["--modes", "fp8"], "unknown precision 'fp8'; valid: fp32, amp-bf16, amp-fp16, bf16"),
        (["--modes", "bf16+all"], "unknown checkpointing 'all'; valid: none, blocks"),
    ],
)
def test_bad_names_are_one_line_errors_with_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m bench.dp: error: ") and message in err and err.count("\n") == 1


def test_module_entry_point_exits_2_on_unknown_method():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dp", "--methods", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2 and "unknown DP method 'nope'" in proc.stderr and proc.stdout == ""
