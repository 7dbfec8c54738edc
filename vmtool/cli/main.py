"""The CLI's single door: parse argv, dispatch to one library call, map exceptions to exit codes.

Each module in COMMAND_MODULES defines `register(sub)` adding its sub-commands; each sub-command sets
`func(args) -> int`. Only this package prints or exits (pip's base_command._main).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from vmtool import __version__
from vmtool.errors import VmtoolError
from vmtool.log import setup_logging

# Top-level command -> the module that registers it. Only the module of the command being run is
# imported, so a `vmtool stage` started by 32 jobs at once does not pay for libvirt, lxml or boto3.
COMMANDS = {
    "inspect": "vmtool.cli.image",
    "build": "vmtool.cli.image",
    "image": "vmtool.cli.image",
    "stage": "vmtool.cli.stage",
    "cache": "vmtool.cli.stage",
    "domain": "vmtool.cli.domain",
    "launch": "vmtool.cli.launch",
    "queue": "vmtool.cli.queue",
    "disk": "vmtool.cli.publish",
    "publish": "vmtool.cli.publish",
    "demo": "vmtool.cli.demo",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _command_of(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def make_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = _Parser(prog="vmtool", description="Run whole KVM virtual machines as batch jobs.")
    parser.add_argument("--version", action="version", version=f"vmtool {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--debug", action="store_true", help="log every command and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    command = _command_of(argv)
    for name in (COMMANDS[command],) if command else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = make_parser(args_list)
        args = parser.parse_args(args_list)
    except _UsageError as e:
        sys.stderr.write(f"vmtool: error: {e}\nhint: see 'vmtool --help'\n")
        return EXIT_USAGE
    except SystemExit as e:  # --help and --version
        return int(e.code or 0) if isinstance(e.code, int) else 0
    setup_logging(args.verbose, args.debug)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args))
    except VmtoolError as e:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"vmtool: error: {e.message}\n")
        if e.hint:
            sys.stderr.write(f"hint: {e.hint}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("vmtool: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception:
        logging.getLogger("vmtool").debug("unexpected error", exc_info=True)
        sys.stderr.write("vmtool: internal error (a bug in vmtool):\n")
        traceback.print_exc()
        return 3


def entry() -> None:
    sys.exit(main())
