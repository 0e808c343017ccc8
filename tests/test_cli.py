"""The `imm-trl` entry point: subcommands import only what they run."""

import subprocess
import sys

import pytest

from imm_trl.cli import LAZY_COMMANDS, build_parser


def imported_after(args: list[str]) -> set[str]:
    code = (
        "import sys\nfrom imm_trl.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nprint('MODULES', *sorted(sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    line = next(line for line in run.stdout.splitlines() if line.startswith("MODULES "))
    return set(line.split()[1:])


def test_merge_help_imports_no_training_stack():
    modules = imported_after(["merge", "--help"])
    assert "imm_trl.cli" in modules
    assert not {"torch", "transformers", "trl", "datasets", "vllm"} & modules


@pytest.mark.parametrize("name", [entry[0] for entry in LAZY_COMMANDS])
def test_each_lazy_command_is_registered_alone_and_in_the_full_parser(name):
    alone = build_parser(name)._subparsers._group_actions[0].choices
    assert set(alone) == {"prepare-model", "merge", name}
    full = build_parser()._subparsers._group_actions[0].choices
    assert set(full) == {"prepare-model", "merge", *(entry[0] for entry in LAZY_COMMANDS)}
