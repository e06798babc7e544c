"""Workload specs ("name:key=value:..."): parsing, the canonical name, typed overrides, one-line errors, the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from models import WorkloadError, format_workload_spec, get_workload, list_workloads, parse_workload_spec
from models.catalog import TINY_WORKLOADS

REPO = Path(__file__).resolve().parents[2]


def one_line_error(match: str):
    """pytest.raises for a WorkloadError matching ``match`` (checked one line by the caller)."""
    return pytest.raises(WorkloadError, match=match)


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_plain_name_and_literal_values_in_order():
    assert parse_workload_spec("gpt2-large") == ("gpt2-large", {})
    name, overrides = parse_workload_spec("x:b=128:a=False:c=0.5:d=None:e=-3:f='128':g=bfloat16")
    assert name == "x"
    assert list(overrides) == ["b", "a", "c", "d", "e", "f", "g"]  # the order given, not sorted
    assert overrides == {"b": 128, "a": False, "c": 0.5, "d": None, "e": -3, "f": "128", "g": "bfloat16"}
    assert type(overrides["b"]) is int and type(overrides["a"]) is bool


def test_parse_never_executes_a_value():
    _, overrides = parse_workload_spec("x:k=__import__('os').getpid()")
    assert overrides == {"k": "__import__('os').getpid()"}  # not a literal: kept as the plain string


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("gpt2:seq_len=1,gpt2", "contains ','"),
        ("", "non-empty"),
        (":seq_len=1", "no name"),
        ("gpt2:seq_len", "expected key=value"),
        ("gpt2:seq_len=", "expected key=value"),
        ("gpt2:=5", "expected key=value"),
        ("gpt2:seq len=5", "expected key=value"),
        ("gpt2:seq_len=1:seq_len=2", "appears twice"),
    ],
)
def test_parse_errors_are_one_line(spec, problem):
    with one_line_error(problem) as info:
        parse_workload_spec(spec)
    assert "\n" not in str(info.value)


def test_format_round_trips_and_quotes_only_what_needs_it():
    overrides = {"seq_len": 128, "tie_weights": False, "p": 0.25, "no": None, "dtype": "bfloat16"}
    overrides |= {"tag": "128", "e": ""}  # strings that must be quoted to read back as strings
    spec = format_workload_spec("gpt2", overrides)
    assert spec == "gpt2:seq_len=128:tie_weights=False:p=0.25:no=None:dtype=bfloat16:tag='128':e=''"
    assert parse_workload_spec(spec) == ("gpt2", overrides)


@pytest.mark.parametrize("value", [(1, 2), "a:b", "a,b", math.nan, len])
def test_format_rejects_values_a_spec_cannot_hold(value):
    with one_line_error("cannot be written in a workload spec"):
        format_workload_spec("x", {"k": value})


# ------------------------------------------------------------------------------------------------ get_workload(spec)


def test_spec_and_keywords_give_the_same_workload_named_by_its_spec():
    from_spec = get_workload("gpt2-large:seq_len=128")
    from_keywords = get_workload("gpt2-large", seq_len=128)
    for workload in (from_spec, from_keywords):
        assert workload.name == "gpt2-large:seq_len=128" and workload.base_name == "gpt2-large"
        assert workload.overrides == {"seq_len": 128} and workload.tokens_per_sample == 128
    plain = get_workload("gpt2-large")
    assert (plain.name, plain.base_name, plain.overrides) == ("gpt2-large", "gpt2-large", {})


def test_spec_overrides_reach_the_model():
    workload = get_workload("dit-xl-2-cond:num_classes=10:learnable_pos_embed=True")
    assert workload.name == "dit-xl-2-cond:num_classes=10:learnable_pos_embed=True"
    model = workload.build_model(device="meta")
    assert model.y_embedder.embedding_table.num_embeddings == 11 and model.pos_embed.requires_grad
    untied = get_workload("gpt-tiny:tie_weights=False").build_model()
    assert untied.lm_head.weight is not untied.wte.weight


def test_name_is_canonical():
    # keyword overrides follow the spec's; literals are written back in one spelling
    assert get_workload("gpt-tiny:seq_len=0x8", tie_weights=False).name == "gpt-tiny:seq_len=8:tie_weights=False"
    assert get_workload("dit-tiny-cond:mlp_ratio=2").info["config"] == "DiT-tiny"  # an int is a valid float
    with one_line_error(r"\['seq_len'\] given both in the spec and as keywords"):
        get_workload("gpt-tiny:seq_len=8", seq_len=4)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpt2-large:seq_len=abc", r"^workload 'gpt2-large': override seq_len must be int, got 'abc'$"),
        ("gpt2-large:tie_weights=maybe", r"override tie_weights must be bool, got 'maybe'$"),
        ("gpt2-large:tie_weights=1", r"override tie_weights must be bool, got 1$"),
        ("gpt2-large:seq_len=True", r"override seq_len must be int, got True$"),
        ("dit-xl-2-cond:num_classes=1.5", r"override num_classes must be int, got 1.5$"),
        ("dit-tiny-cond:class_dropout_prob=high", r"override class_dropout_prob must be float, got 'high'$"),
        ("gpt-tiny:seq_len=17", r"seq_len must be an integer in \[1, 16\], got 17"),
        ("dit-tiny-cond:hidden_size=30", r"^workload 'dit-tiny-cond': DiTConfig: hidden_size 30 is not a multiple"),
        ("dit-tiny-cond:hidden_size=-4", r"^workload 'dit-tiny-cond': DiTConfig: .*hidden_size must be >= 1"),
        ("dit-tiny-cond:depth=0", r"depth and num_heads must be >= 1"),
        ("dit-tiny-cond:mlp_ratio=0", r"mlp_ratio must be > 0"),
        ("gpt-tiny:n_embd=0", r"^workload 'gpt-tiny': GPTConfig: .*n_embd must be >= 1"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_workload(spec, message):
    with one_line_error(message) as info:
        get_workload(spec)
    assert "\n" not in str(info.value)


def test_unknown_keys_name_the_valid_ones():
    with one_line_error(r"^workload 'gpt2' takes no override 'nonsense'; valid keys: vocab_size, .*seq_len, seed$"):
        get_workload("gpt2:nonsense=1")
    with one_line_error(r"no override 'num_classes'; valid keys: input_size, .*pos_embed_in_submodule, seed$"):
        get_workload("dit-tiny-uncond:num_classes=5")
    # the variant is the name's: neither the label switch nor the plain switch is an override
    for spec in ("dit-tiny-plain:num_classes=5", "dit-tiny-cond:class_conditional=False", "dit-tiny-uncond:plain=True"):
        with one_line_error("takes no override"):
            get_workload(spec)
    assert get_workload("dit-tiny-cond:seed=5").seed == 5


# ------------------------------------------------------------------------------------------------ size limits


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpt2:n_layer=1000000000", r"^workload 'gpt2': n_layer=1000000000 is above the limit for n_layer, 1,024$"),
        ("gpt2:n_embd=" + "9" * 23, r"n_embd=9{23} is above the limit for n_embd, 65,536$"),
        ("gpt2:vocab_size=100000000", r"vocab_size=100000000 is above the limit for vocab_size, 16,777,216$"),
        ("gpt2:block_size=10000000", r"block_size=10000000 is above the limit for block_size"),
        ("gpt2:seq_len=10000000", r"seq_len=10000000 is above the limit for seq_len"),
        ("gpt2:n_head=4096", r"n_head=4096 is above the limit for n_head, 1,024$"),
        ("dit-xl-2-cond:depth=100000", r"^workload 'dit-xl-2-cond': depth=100000 is above the limit for depth, 1,024"),
        ("dit-xl-2-cond:hidden_size=1000000", r"hidden_size=1000000 is above the limit for hidden_size"),
        ("dit-xl-2-cond:num_heads=2048", r"num_heads=2048 is above the limit for num_heads"),
        ("dit-xl-2-cond:input_size=4096", r"input_size=4096 is above the limit for input_size"),
        ("dit-xl-2-cond:in_channels=4096", r"in_channels=4096 is above the limit for in_channels"),
        ("dit-xl-2-cond:num_classes=1000000000", r"num_classes=1000000000 is above the limit for num_classes"),
        ("dit-tiny-cond:mlp_ratio=1e400", r"mlp_ratio=inf is above the limit for mlp_ratio, 64.0$"),
    ],
)
def test_a_size_above_its_limit_is_refused_naming_the_field_and_the_limit(spec, message):
    with one_line_error(message) as info:
        get_workload(spec)
    assert "\n" not in str(info.value)


def test_sizes_within_their_limits_that_multiply_past_the_parameter_limit_are_refused():
    with one_line_error(r"^workload 'gpt2': n_layer=1024, n_embd=65536, n_head=16 make about 5.3e\+13 parameters"):
        get_workload("gpt2:n_layer=1024:n_embd=65536:n_head=16")
    with one_line_error(r"depth=1024, hidden_size=27648, num_heads=128 make about 1.4e\+13 parameters"):
        get_workload("dit-xl-2-cond", depth=1024, hidden_size=27648, num_heads=128)  # keywords are bounded too


def test_the_limits_leave_room_for_ten_times_the_largest_paper_models():
    tenfold = {
        "gpt2-xl": "gpt2-xl:n_layer=480:n_embd=16000:n_head=250:block_size=10240:vocab_size=502570",
        "dit-xl-2-cond-512": "dit-xl-2-cond-512:depth=280:hidden_size=11520:num_heads=160:input_size=640",
    }
    for paper, spec in tenfold.items():
        big, base = get_workload(spec).model_fn.args[0], get_workload(paper).model_fn.args[0]
        assert big.approx_parameters > 500 * base.approx_parameters  # ~1000× the parameters, accepted


@pytest.mark.parametrize("name", ["dit-xl-2-cond", "dit-xl-2-plain", "dit-s-2-uncond-512", "gpt2-xl", "gpt2-untied"])
def test_the_parameter_estimate_is_a_close_lower_bound(name):
    from models import parameter_counts

    workload = get_workload(name)
    total, _ = parameter_counts(workload.build_model(device="meta"))
    assert 0.997 * total <= workload.model_fn.args[0].approx_parameters <= total


def test_a_seed_is_what_torch_generators_take():
    assert get_workload(f"gpt-tiny:seed={2**64 - 1}").seed == 2**64 - 1
    for bad in ("9" * 23, "-1"):  # 23 digits passed the spec check, then failed every case
        with one_line_error(r"^workload 'gpt-tiny': seed must be an integer in \[0, 2\*\*64 - 1\]"):
            get_workload(f"gpt-tiny:seed={bad}")


# ------------------------------------------------------------------------------------------------ unknown names


def test_unknown_name_points_to_the_listing_and_the_tiny_workloads():
    with one_line_error(r"unknown workload 'foo' \(`python -m models` lists all \d+; the CPU-sized ones") as info:
        get_workload("foo:seq_len=3")
    assert "did you mean" not in str(info.value) and "\n" not in str(info.value)
    assert all(name in str(info.value) for name in TINY_WORKLOADS)


@pytest.mark.parametrize(
    "typo, expected",
    [
        ("dit-xl-2-cnd", "dit-xl-2-cond"),
        ("dit-tiny", "dit-tiny-cond"),
        ("dit_tiny_plain", "dit-tiny-plain"),
        ("tiny", "gpt-tiny-untied"),
        ("DiT-XL/2", "dit-xl-2-cond"),
        ("gpt-tiny-tied", "gpt-tiny"),
    ],
)
def test_unknown_name_suggests_close_names(typo, expected):
    with one_line_error(r"unknown workload .*; did you mean ") as info:
        get_workload(typo)
    suggestions = str(info.value).split("did you mean ")[1].split("?")[0].split(", ")
    assert expected in suggestions


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_lists_workloads_with_counts():
    result = subprocess.run(
        [sys.executable, "-m", "models"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    line = next(text for text in result.stdout.splitlines() if text.startswith("dit-xl-2-cond "))
    assert "675,129,632" in line and "674,834,720" in line and "x_t, t, y" in line
    assert len(result.stdout.splitlines()) == 2 + len(list_workloads())


def test_cli_filter(capsys):
    from models.__main__ import main

    assert main(["--filter", "gpt2-x"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["gpt2-xl", "gpt2-xl-untied"]
    assert "1,557,611,200" in rows[0]
    # untied: one more vocab × width matrix (50257 × 1600) than tied
    assert f"{1_557_611_200 + 50257 * 1600:,}" in rows[1]
    assert main(["--workload-module", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_cli_takes_specs(capsys):
    from models.__main__ import main

    assert main(["gpt2-large:seq_len=128", "dit-xl-2-cond", "dit-xl-2-cond:num_classes=10"]) == 0
    rows = [r.split("  ")[0] for r in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["gpt2-large:seq_len=128", "dit-xl-2-cond", "dit-xl-2-cond:num_classes=10"]
    assert main(["gpt2-large:seq_len=abc"]) == 2
    assert "seq_len must be int" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpt-tiny:seed=" + "9" * 23, "seed must be an integer"),  # a traceback from torch.manual_seed
        ("gpt2:n_layer=1000000000", "above the limit for n_layer"),  # a hang, building a billion blocks
    ],
)
def test_cli_refuses_a_bad_spec_in_one_line(capsys, spec, message):
    from models.__main__ import main

    assert main([spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m models: error: workload ") and message in err and err.count("\n") == 1


def test_cli_usage_error_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "models", "--filter"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr == "python -m models: error: argument --filter: expected one argument (see --help)\n"
