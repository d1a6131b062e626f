"""docs/commands: one page per command, its --help verbatim (so the pages match the parser) and an example
that the parser accepts."""

import os
import shlex
import subprocess
import sys

import pytest

from deepatlas_fast.cli import build_parser

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "docs"))
import make_command_docs  # noqa: E402


def test_every_command_has_a_page_matching_its_help():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_command_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {name[:-3] for name in os.listdir(os.path.join(ROOT, "docs", "commands"))} == commands
    assert set(make_command_docs.EXAMPLES) == commands


@pytest.mark.parametrize("name", sorted(make_command_docs.EXAMPLES))
def test_examples_parse(name):
    parser = build_parser()
    for line in make_command_docs.EXAMPLES[name].split("\n"):
        if line.startswith("deepatlas-fast"):
            argv = shlex.split(line.replace("\\", ""))[1:]
            continuation = make_command_docs.EXAMPLES[name].split("\n")
            if line.rstrip().endswith("\\"):
                argv += shlex.split(continuation[continuation.index(line) + 1])
            args = parser.parse_args(argv)
            assert args.command == name


def test_version_flag_prints_the_package_version(capsys):
    import deepatlas_fast

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"deepatlas-fast {deepatlas_fast.__version__}"
