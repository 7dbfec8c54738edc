from __future__ import annotations

import pytest

from vmtool.cli.main import main

pytestmark = pytest.mark.unit


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert "vmtool" in capsys.readouterr().out


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_every_command_is_registered_by_its_module() -> None:
    import importlib

    from vmtool.cli.main import COMMANDS, make_parser

    for command, module in COMMANDS.items():
        parser = make_parser([command])
        sub = next(a for a in parser._actions if a.dest == "command")
        assert command in sub.choices, f"{module} does not register {command!r}"  # type: ignore[attr-defined]
        importlib.import_module(module)


def test_help_lists_all_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("build", "stage", "launch", "queue", "publish", "demo"):
        assert command in out
