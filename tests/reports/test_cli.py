"""``python -m reports`` as a command: bad input is one line on stderr with exit 2, never a traceback."""

from __future__ import annotations

from reports.__main__ import main
from tests.reports.fakes import run_cli, write_two_gpu_files
from tests.reports.test_load import write_bad


def test_cli_bad_input_exits_2_with_one_line_naming_the_file(tmp_path, capsys):
    bad = [write_bad(tmp_path, n) for n in ("empty.json", "truncated.json", "foreign.json")]
    proc = run_cli(bad[1], "--out", tmp_path / "r")  # the real command line: what reaches stderr, the exit code
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(bad[1]) in proc.stderr
    for path in bad:  # in-process, an exception that escaped would fail the test
        assert main([str(path), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and str(path) in err
    # --skip-bad with nothing usable left is still an error (the report with good files: test_report.py)
    assert main([*map(str, bad), "--skip-bad", "--out", str(tmp_path / "r2")]) == 2


def test_usage_errors_are_one_line(tmp_path):
    a100, _ = write_two_gpu_files(tmp_path)
    proc = run_cli("compare", a100)  # NEW missing
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "the following arguments are required: new" in proc.stderr
