"""One command-line vocabulary: the same flag spelt alike by every command, an example in
every --help, and a `dast --help` that imports no command (and so no torch)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dast.cli import COMMANDS, build_parser, chosen_command, main
from dast.commands._common import parse_seeds
from dast.commands.demo import FULL_TIME, QUICK_TIME
from dast.config import RuntimeConfig
from dast.contexts import AMP_ALIASES, AMP_DTYPES, amp_dtype, amp_name
from dast.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, and every sub-command's (`convert labels`, ...)."""
    out = {}
    for name, p in _subparsers(build_parser()).items():
        out[name] = p
        out.update({f"{name} {sub}": q for sub, q in _subparsers(p).items()})
    return out


def test_every_command_and_sub_command_has_an_example_of_itself_in_its_help() -> None:
    parsers = _all_parsers()
    assert {"train", "init-config", "convert labels", "convert official", "convert imagenet"} <= set(parsers)
    for name, p in parsers.items():
        text = p.format_help()
        assert "\nexamples:\n" in text, name
        examples = [line.strip() for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]
        command = name.split()[0]
        assert examples and all(line.startswith("dast ") for line in examples), (name, examples)
        assert any(line.startswith(f"dast {command} ") for line in examples), (name, examples)


def test_the_command_table_names_every_module_and_its_summary_is_its_help_line() -> None:
    full = build_parser()
    (commands,) = [a for a in full._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in commands._choices_actions}
    for name, module, summary in COMMANDS:
        mod = importlib.import_module(f"dast.commands.{module}")
        assert callable(mod.add_parser) and callable(mod.run)
        assert helps[name] == summary and not summary.endswith(".")
    listing = build_parser(()).format_help()  # no command module imported: the same list
    assert all(f"\n    {name}" in listing for name, _, _ in COMMANDS)


def test_the_chosen_command_is_the_first_word_that_is_not_an_option() -> None:
    assert chosen_command(["--debug", "train", "--config", "x"]) == "train"
    assert chosen_command(["configs"]) == "configs"
    assert chosen_command(["--help"]) is None
    assert chosen_command(["trian"]) is None  # argparse then names the valid choices
    assert chosen_command([]) is None


def test_dast_help_imports_no_command_module_and_no_torch() -> None:
    code = (
        "import sys\n"
        "from dast.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dast.commands.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_configs_runs_without_torch() -> None:
    code = "import sys\nfrom dast.cli import main\nmain(['configs'])\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_no_progress_is_the_flag_and_quiet_its_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = _all_parsers()
    with_flag = sorted(n for n, p in parsers.items() if "--no-progress" in p._option_string_actions)
    assert with_flag == [
        "check-data",
        "convert labels",
        "demo",
        "evaluate",
        "make-data",
        "predict",
        "pseudo-label",
        "train",
    ]
    for name in with_flag:
        p = parsers[name]
        assert "--quiet" not in p.format_help()  # the alias works but is not advertised
    args = parsers["check-data"].parse_args(["--dataset", "folder", "--root", "x", "--quiet"])
    assert args.no_progress is True
    assert capsys.readouterr().err == "note: --quiet is deprecated; use --no-progress\n"
    assert parsers["check-data"].parse_args(["--dataset", "folder", "--root", "x"]).no_progress is False


def test_one_amp_table_for_every_command_and_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert AMP_DTYPES == {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert [amp_dtype(n) for n in ("none", "bf16", "fp16", "off")] == [None, torch.bfloat16, torch.float16, None]
    assert [amp_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["none", "bf16", "fp16"]
    with pytest.raises(ValueError, match="unknown autocast name 'fp8'"):
        amp_dtype("fp8")
    parsers = _all_parsers()
    required = {
        "predict": ["--checkpoint", "c", "--input", "i", "--out", "o"],
        "evaluate": ["--dataset", "folder", "--root", "r", "--checkpoint", "c", "--out", "o"],
        "pseudo-label": ["--checkpoint", "c", "--config", "x", "--out", "o"],
    }
    for name, argv in required.items():
        amp = parsers[name]._option_string_actions["--amp"]
        assert list(amp.choices) == list(AMP_DTYPES) and amp.default == "none", name
        assert parsers[name].parse_args([*argv, "--amp", "bf16"]).amp == "bf16"
        assert parsers[name].parse_args([*argv, "--amp", "off"]).amp == "none"  # the old spelling still works
        assert capsys.readouterr().err == "note: --amp off is deprecated; use --amp none\n"
    # the config spells the same names (plus auto)
    assert set(RuntimeConfig.model_fields["amp"].annotation.__args__) == {"auto", *AMP_DTYPES}
    assert set(AMP_ALIASES) == {"off"}


@pytest.mark.parametrize(
    ("words", "seeds"),
    [(["0", "1", "2"], [0, 1, 2]), (["0,1,2"], [0, 1, 2]), (["0,1", "2"], [0, 1, 2]), (["3"], [3]), (["4,"], [4])],
)
def test_seed_lists_are_taken_in_both_forms(words: list[str], seeds: list[int]) -> None:
    assert parse_seeds(words) == seeds
    parsers = _all_parsers()
    assert parse_seeds(parsers["demo"].parse_args(["--seeds", *words]).seeds) == seeds
    assert (
        parse_seeds(parsers["sweep"].parse_args(["--configs", "demo", "--out", "o", "--seeds", *words]).seeds) == seeds
    )


@pytest.mark.parametrize("words", [["0,x"], ["1", "1"], ["-3"], ["1.5"], [","]])
def test_bad_seed_lists_are_one_user_error(words: list[str]) -> None:
    with pytest.raises(UserError, match=r"--seeds takes .*whole numbers"):
        parse_seeds(words)


def test_sweep_takes_a_comma_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "--configs", "demo", "--seeds", "0,1", "--out", str(tmp_path), "--gpus", "cpu", "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("--set seed=")[1].split()[0] for line in lines] == ["0", "1"]


def test_the_demo_times_in_help_are_the_readme_s() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"--quick              # the same pipeline, shorter: {QUICK_TIME}" in readme
    assert f"# one seed: {FULL_TIME} on 2 cores" in readme
