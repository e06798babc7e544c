"""The GPU CI workflow (.github/workflows/gpu-bench.yml) calls the reports and the bench with real options."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys

import pytest

from reports.__main__ import build_parsers
from tests.reports.fakes import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "gpu-bench.yml"


def _workflow_commands() -> list[list[str]]:
    """Every `python -m X ...` / `pytest ...` command of every run step, as tokens (line continuations joined)."""
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    commands = []
    for job in data["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ").replace("${{ matrix.gpu }}", "a100")
            for line in script.splitlines():
                tokens = shlex.split(line, comments=True)
                for i, token in enumerate(tokens):
                    if token == "pytest" or (token.endswith("python") and tokens[i + 1 : i + 2] == ["-m"]):
                        commands.append(tokens[i:])
                        break
    return commands


def test_workflow_is_yaml_with_a_gpu_matrix_of_runner_labels():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    bench = data["jobs"]["bench"]
    include = bench["strategy"]["matrix"]["include"]
    assert {e["gpu"]: e["runner"] for e in include} == {
        "a100": ["self-hosted", "a100"],
        "h100": ["self-hosted", "h100"],
    }
    assert bench["runs-on"] == "${{ matrix.runner }}"
    steps = {s.get("name", s.get("uses")): s for s in bench["steps"]}
    assert steps["Benchmark"]["env"]["DPMEM_RUNNER_LABEL"] == "${{ matrix.gpu }}"
    assert "pip install -e ." in steps["Install (keeping the runner's CUDA torch)"]["run"]
    uploads = [s for s in bench["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["if"] == "always()"
    report = data["jobs"]["report"]
    assert report["needs"] == "bench"
    assert any(str(s.get("uses", "")).startswith("actions/download-artifact") for s in report["steps"])
    compare_step = next(s for s in report["steps"] if s.get("name") == "Compare with the baseline")
    assert "if [ -f baseline/gpu-bench.json ]" in compare_step["run"]  # skips cleanly without a baseline


def test_workflow_reports_commands_use_real_subcommands_and_options():
    parsers = build_parsers()
    seen = set()
    for tokens in _workflow_commands():
        if tokens[0] == "pytest" or tokens[2] != "reports":
            continue
        args = tokens[3:]
        command = args.pop(0) if args and args[0] in parsers else "render"
        seen.add(command)
        known = {o for action in parsers[command]._actions for o in action.option_strings}
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in known, f"workflow passes unknown option {arg} to reports {command}"
        parsed = parsers[command].parse_args(args)  # every command also parses as a whole
        if command == "compare":
            assert parsed.base == "baseline/gpu-bench.json" and parsed.max_regression == "5%"
    assert seen == {"render", "compare", "export", "merge"}


def test_workflow_pytest_command_names_real_paths_and_options():
    commands = [t for t in _workflow_commands() if t[0] == "pytest"]
    assert len(commands) == 1
    tokens = commands[0]
    paths = [
        t
        for prev, t in itertools.pairwise(tokens)
        if not t.startswith("-") and not (prev.startswith("--") and "=" not in prev)
    ]
    assert paths == ["bench/"] and (ROOT / "bench" / "test_dp_step.py").is_file()
    if not (ROOT / "conftest.py").exists():
        pytest.skip("root conftest.py (the bench options) does not exist yet; cannot cross-check --preset/--results")
    help_text = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--help", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    for token in tokens[1:]:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in known, f"workflow passes unknown pytest option {token}"
    from bench.config import PRESETS

    assert tokens[tokens.index("--preset") + 1] in PRESETS
