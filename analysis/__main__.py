"""`python -m analysis COMMAND ...`: analyses of finished runs (ablations, knockouts, exports, ...).

Subcommands are discovered: every module in `analysis/commands/` that defines `register(subparsers)`
adds itself (see `analysis/commands/__init__.py`). Bad input (a missing run directory, checkpoint or
file) is reported as one line, `error: <file>: <what is wrong>`, on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands

PROG = "python -m analysis"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ...`) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: printed as one line, no traceback."""
    from train.errors import RunError

    from .transformerlens import ExportError
    from .runs import AnalysisError

    return (AnalysisError, RunError, ExportError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, disk full, ...
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
