"""The GPU CI workflow (.github/workflows/gpu-bench.yml), parsed as YAML and checked against the real code: its
commands use real options, the bench runs the venv's pytest on one GPU per runner, the install keeps the
runner's torch, artifact file names are valid, and the report job renders unless the run was cancelled."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config.cli import pytest_bench_command

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "gpu-bench.yml"
# Characters actions/upload-artifact v4 refuses in a file path.
ARTIFACT_FORBIDDEN = set('":<>|*?\r\n')


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(job: str) -> dict[str, dict]:
    return {s.get("name", s.get("uses")): s for s in _workflow()["jobs"][job]["steps"]}


def _workflow_commands() -> list[list[str]]:
    """Every `python -m X ...` / `pytest ...` command of every run step, as tokens (line continuations joined)."""
    commands = []
    for job in _workflow()["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ").replace("${{ matrix.gpu }}", "a100")
            for line in script.splitlines():
                tokens = shlex.split(line, comments=True)
                for i, token in enumerate(tokens):
                    if token == "pytest" or (token.endswith("python") and tokens[i + 1 : i + 2] == ["-m"]):
                        commands.append(tokens[i:])
                        break
    return commands


def _pytest_commands() -> list[list[str]]:
    """The pytest commands, each from `pytest` on (whatever starts it)."""
    return [t[t.index("pytest") :] for t in _workflow_commands() if "pytest" in t[:3]]


def test_workflow_is_yaml_with_a_gpu_matrix_of_runner_labels():
    data = _workflow()
    bench = data["jobs"]["bench"]
    include = bench["strategy"]["matrix"]["include"]
    assert {e["gpu"]: e["runner"] for e in include} == {
        "a100": ["self-hosted", "a100"],
        "h100": ["self-hosted", "h100"],
    }
    assert bench["runs-on"] == "${{ matrix.runner }}"
    steps = _steps("bench")
    assert steps["Benchmark"]["env"]["DPMEM_RUNNER_LABEL"] == "${{ matrix.gpu }}"
    uploads = [s for s in bench["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["if"] == "always()"  # a killed run still uploads its JSON-lines file
    report = data["jobs"]["report"]
    assert report["needs"] == ["bench", "bench-ranks"]
    assert any(str(s.get("uses", "")).startswith("actions/download-artifact") for s in report["steps"])
    compare_step = _steps("report")["Compare with the baseline"]
    assert "if [ -f baseline/gpu-bench.json ]" in compare_step["run"]  # skips cleanly without a baseline


def test_report_job_renders_after_failures_but_not_after_a_cancel():
    report_if = _workflow()["jobs"]["report"]["if"]
    assert re.fullmatch(r"\$\{\{\s*!cancelled\(\)\s*\}\}|!cancelled\(\)", report_if), report_if


def test_workflow_reports_commands_use_real_subcommands_and_options():
    from reports.__main__ import build_parsers

    parsers = build_parsers()
    seen = set()
    for tokens in _workflow_commands():
        if "pytest" in tokens[:3] or tokens[2] != "reports":
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


def test_bench_runs_the_venvs_pytest_as_a_module_on_one_gpu():
    """A bare `pytest` can be the runner's system pytest, which does not see the venv's packages. Both bench
    jobs (one GPU per runner; the optional many-rank one) run it so."""
    commands = [t for t in _workflow_commands() if "pytest" in t[:3]]
    assert len(commands) == 2
    for command in commands:
        assert command[:3] == [".venv/bin/python", "-m", "pytest"]
        tokens = command[2:]
        assert tokens[tokens.index("--devices") + 1] == "cuda:0"  # the one-process cases: the first GPU


def test_workflow_pytest_commands_name_real_paths_and_options():
    help_text = subprocess.run(
        pytest_bench_command("--help"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    from bench.config.settings import PRESETS

    for tokens in _pytest_commands():
        paths = [
            t
            for prev, t in itertools.pairwise(tokens)
            if not t.startswith("-") and not (prev.startswith("--") and "=" not in prev)
        ]
        assert paths == ["bench/"] and (ROOT / "bench" / "test_dp_step.py").is_file()
        for token in tokens[1:]:
            if token.startswith("--"):
                assert token.split("=", 1)[0] in known, f"workflow passes unknown pytest option {token}"
        assert tokens[tokens.index("--preset") + 1] in PRESETS


def test_many_rank_job_is_optional_and_its_ranks_fit_its_runner():
    """The multi-GPU entry runs only when asked (a dispatch input or a repository variable), on the runner
    labelled multi-gpu, whose install checks it has the GPUs the largest world size needs (one per rank)."""
    from bench.config.options import parallel_strategies, world_sizes

    data = _workflow()
    job = data["jobs"]["bench-ranks"]
    assert "inputs.multi_gpu" in job["if"] and "vars.DPMEM_MULTI_GPU" in job["if"]
    assert data[True]["workflow_dispatch"]["inputs"]["multi_gpu"]["default"] is False  # YAML reads `on` as True
    assert job["runs-on"] == ["self-hosted", "multi-gpu"]
    (tokens,) = [t for t in _pytest_commands() if "--world-sizes" in t]
    sizes = world_sizes(tokens[tokens.index("--world-sizes") + 1])
    assert parallel_strategies(tokens[tokens.index("--parallel") + 1]) == ("ddp", "fsdp")
    install = {s["name"]: s for s in job["steps"] if "name" in s}["Install (keeping the runner's CUDA torch)"]
    assert f"device_count() >= {max(sizes)}" in install["run"]
    assert job["steps"][-1]["if"] == "always()" and job["steps"][-1]["with"]["name"] == "results-multi-gpu"


@pytest.mark.parametrize("job", ["bench", "bench-ranks"])
def test_install_pins_the_runners_torch_for_every_pip_install(tmp_path, job):
    """pip must keep the runner's CUDA torch or fail, never replace it: every pip install in a bench job runs
    under a constraint file holding torch==<the installed version>, written by a command that works here."""
    script = _steps(job)["Install (keeping the runner's CUDA torch)"]["run"]
    lines = [shlex.split(line, comments=True) for line in script.splitlines()]
    writers = [t for t in lines if ">" in t and t[t.index(">") + 1] == "$RUNNER_TEMP/torch-constraint.txt"]
    (writer,) = writers
    installs = [t for t in lines if t[1:4] == ["-m", "pip", "install"]]
    assert installs and all(t[t.index("-c") + 1] == "$RUNNER_TEMP/torch-constraint.txt" for t in installs)
    assert any(t[-2:] == ["-e", "."] for t in installs)
    # The writer's command, run with this interpreter, pins this interpreter's torch.
    import torch

    command = [sys.executable if token == ".venv/bin/python" else token for token in writer[: writer.index(">")]]
    constraint = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert constraint == f"torch=={torch.__version__}"
    # pip accepts it, and with it dpmem's requirements resolve to what is installed (no download, no change).
    tomllib = pytest.importorskip("tomllib")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]))
    constraint_file = tmp_path / "constraint.txt"
    constraint_file.write_text(constraint + "\n")
    pip_install = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index"]
    pip = subprocess.run(
        [*pip_install, "-c", str(constraint_file), "-r", str(requirements)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    assert "Would install" not in pip.stdout


def test_snapshot_file_names_are_valid_artifact_paths(tmp_path):
    """The bench job uploads results/ (snapshots included); upload-artifact v4 refuses ':' in a path."""
    from bench.case.runner import snapshot_path
    from bench.case.spec import CaseSpec
    from bench.config.settings import BenchConfig
    from bench.dp import resolve_privacy

    config = BenchConfig.from_fields(
        preset="gpu-small", rounds=1, privacy=resolve_privacy(1.0), snapshot_dir="results/snapshots"
    )
    spec = CaseSpec("gpt2-large:seq_len=128", "bk", 16, "cuda:0")
    path = snapshot_path(config, spec)
    assert path == "results/snapshots/gpt2-large_seq_len=128-bk-bs16-cuda_0.pickle"
    assert not set(path) & ARTIFACT_FORBIDDEN
    uploads = [s for s in _workflow()["jobs"]["bench"]["steps"] if "upload-artifact" in str(s.get("uses", ""))]
    assert uploads[0]["with"]["path"] == "results/" and config.measure.snapshot_dir.startswith("results/")


# ---------------------------------------------------------------------------------------------------------------
# .ci/run: the README's install without tox, run as documented
# ---------------------------------------------------------------------------------------------------------------
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"


def _readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block under ``heading`` in the README, comments and blank lines dropped."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [" ".join(shlex.split(line, comments=True)) for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readmes_cpu_install_in_a_fresh_venv_command_for_command():
    commands = _readme_commands("### Without tox, on a CPU machine")
    # the CPU torch before dpmem, so that `pip install -e .` (torch>=2.6) keeps it instead of pulling CUDA's
    assert commands.index("pip install torch==2.13.0") < commands.index("pip install -e .")
    assert any(c.startswith("pytest bench/ ") for c in commands) and any(c.startswith("python -m ") for c in commands)
    _, venv_line, step_text = CI_RUN.read_text().partition("\ncpu_venv=")
    assert venv_line and "mktemp -d" in step_text.splitlines()[0]  # a fresh venv, not one left by an earlier run
    step = [" ".join(shlex.split(line, comments=True)) for line in step_text.splitlines()[1:]]
    ran = [c.replace(".venv", "$cpu_venv") for c in commands]
    assert [line for line in step if line in ran] == ran  # every README line, in the README's order
    assert any("torch.version.cuda" in line and "sys.exit" in line for line in step)  # and it checks it got CPU
