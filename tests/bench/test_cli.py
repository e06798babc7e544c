"""The ``python -m`` tools' shared behaviour (bench/config/cli.py): a usage error is one line and exit 2, Ctrl-C is one
line and exit 130; and ``python -m bench.ranks.predict``'s bad values, refused by the bench's own parsers."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from bench.config.cli import OneLineParser, run
from bench.ranks import predict
from tests.bench.test_matrix import REPO, _env


def test_a_usage_error_is_one_line_naming_the_program(capsys):
    parser = OneLineParser(prog="python -m tool")
    parser.add_argument("--count", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--count", "x"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "python -m tool: error: argument --count: invalid int value: 'x' (see --help)\n"


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run(interrupted, "python -m tool") == 130
    assert capsys.readouterr().err == "python -m tool: interrupted\n"
    assert run(lambda: 3, "python -m tool") == 3


def test_ctrl_c_in_the_planner_is_one_line_and_exit_130():
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.plan", "dit-tiny-cond", "--memory", "1GiB"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A job started with `&` by a non-interactive shell (a CI script) inherits SIGINT ignored, and Python
        # keeps it ignored; a terminal's Ctrl-C reaches a process that handles it, as the planner here must.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = proc.stderr.readline()  # the first method's progress line: meta steps are running
        assert "nondp: ok" in first, first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "python -m bench.plan: interrupted\n", err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpt-tiny", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),  # it became 4
        (["gpt-tiny", "--batch-size", "-4"], "argument --batch-size: must be >= 1, got -4"),  # "unsupported", exit 0
        (["gpt-tiny", "--world-size", "0"], "argument --world-size: must be >= 1, got 0"),
        (["gpt-tiny", "--methods", "bk-tild"], "--methods: unknown value 'bk-tild' (did you mean bk-tiled?)"),
        (["gpt-tiny", "--methods", ""], "argument --methods: empty list"),  # printed nothing, exit 0
        (["gpt-tiny", "--optimizer", "sgdd"], "--optimizer: unknown value 'sgdd' (did you mean sgd?)"),
        (["gpt-tiny", "--noise-multiplier", "-1"], "argument --noise-multiplier: must be a finite number >= 0"),
        (["gpt-tinyy"], "unknown workload 'gpt-tinyy'"),  # a traceback
        (["gpt-tiny", "--ranks", "9"], "--ranks: '9' is not a rank of 8"),
    ],
)
def test_predict_refuses_bad_values_in_one_line_exit_2(capsys, argv, message):
    try:
        code = predict.main(argv)
    except SystemExit as exc:  # argparse's errors exit; the checks after parsing return
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("python -m bench.ranks.predict: error: ") and message in captured.err
    assert captured.err.count("\n") == 1, captured.err
