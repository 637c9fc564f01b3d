"""The `vitops` command line: one subcommand per pipeline stage.

Run `vitops --help`. Every command reads `params.yaml` (or `--params FILE`); the flags a command offers
override single values from it. Each command group lives in its own module and registers itself here:
`data_commands` (sample, import, validate), `train_commands` (pretrain-standin, train, evaluate) and
`engine_commands` (export, build, bench).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flows import data_commands, engine_commands, train_commands
from flows.config import DEFAULT_PARAMS, ParamsError, load_params

_GROUPS = (data_commands, train_commands, engine_commands)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: printed as one message without a traceback, exit code 2.

    Each command group names the error classes of the core functions it calls in `user_errors()`; they are
    imported only when an error is being reported, so `vitops validate` never pays for importing torch.
    """
    errors: tuple[type[BaseException], ...] = (ParamsError, FileNotFoundError, NotADirectoryError)
    for group in _GROUPS:
        errors += group.user_errors()
    return errors


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vitops", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="parameter file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vitops` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = load_params(args.params)
        return int(args.handler(args, params) or 0)
    except KeyboardInterrupt:
        print(f"vitops {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"vitops {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
