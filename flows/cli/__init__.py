"""The `vitops` command line: one subcommand per pipeline stage, each a thin caller of a stage function.

Run `vitops --help`. Every command reads `params.yaml` (or `--params FILE`); the flags a command offers
override single values from it. Each command group lives in its own module of this package and registers
itself here: `data` (sample, import, from-log, validate), `train` (pretrain-standin, train, evaluate), `engines`
(export, build, bench), `registry` (gate, register, promote, rollback, history, lineage, verify), `runs`
(retrain, drift, serve), `pilot` (pilot, approve), `endpoint` (the line-side inference endpoint) and `feedback` (import,
accuracy). The commands only parse and print; the stage functions they call do the work.

Exit codes, the same for every command: 0 ok; 1 a gate said no (data gate, parity gate, KPI gate); 2 a usage
or configuration error, with one message; 3 a crash, with its traceback. `-v` adds debug logging and the
traceback of every error. `--params` and `-v` go before or after the subcommand (`vitops retrain --params
FILE -v`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from vitops.flows.cli import data, endpoint, engines, feedback, pilot, registry, runs, train
from vitops.flows.config import DEFAULT_PARAMS, ParamsError, load_params

_GROUPS = (data, train, engines, registry, runs, pilot, endpoint, feedback)

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: printed as one message without a traceback, exit code 2.

    Each command group names the error classes of the core functions it calls in `user_errors()`; they are
    imported only when an error is being reported, so `vitops validate` never pays for importing torch.
    """
    from vitops.flows.connection import CredentialsRefused, ServerUnreachable

    errors: tuple[type[BaseException], ...] = (ParamsError, FileNotFoundError, NotADirectoryError)
    errors += (ServerUnreachable, CredentialsRefused)
    for group in _GROUPS:
        errors += group.user_errors()
    return errors


def _gate_errors() -> tuple[type[BaseException], ...]:
    """Errors that are a gate saying no (exit 1): the parity gates of the engine builds."""
    from vitops.deploy.parity import ParityError

    return (ParityError,)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vitops", description=__doc__.splitlines()[0])
    _add_global_options(parser, argparse.SUPPRESS)
    parser.set_defaults(params=None, verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    _share_global_options(parser)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--params", default=default, help="parameter file (default: params.yaml, which may be absent)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging and tracebacks")


def _share_global_options(parser: argparse.ArgumentParser) -> None:
    """Accept the global options after any subcommand too (`vitops retrain --params FILE -v`).

    A subcommand's copy defaults to SUPPRESS, so it sets the value only when given and never resets one that was
    given before the subcommand.
    """
    for action in parser._actions:  # argparse lists subcommands only there
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for subparser in action.choices.values():
            _add_global_options(subparser, argparse.SUPPRESS)
            _share_global_options(subparser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vitops` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own INFO lines, the libraries' warnings only (their INFO chatter is noise nobody asked for); -v: all.
    # Prefect's run loggers keep INFO (their API handler puts every task's state change on the run page): the
    # terminal's handler drops what is below WARNING and not ours.
    terminal = logging.StreamHandler()
    if not args.verbose:
        terminal.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.startswith("vitops"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[terminal],
    )
    if not args.verbose:
        logging.getLogger("vitops").setLevel(logging.INFO)
        for chatty in ("mlflow", "great_expectations", "alembic"):  # they attach INFO handlers of their own
            logging.getLogger(chatty).setLevel(logging.WARNING)
        # NNCF imports torch's C++ extension builder, which warns on every CPU-only machine that it found no CUDA
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # MLflow sets its loggers' level again when it is imported (database migrations, new experiments):
        # from this variable, which the flow runs `vitops serve` starts inherit too.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        params = load_params(args.params or DEFAULT_PARAMS, must_exist=args.params is not None)
        return int(args.handler(args, params) or 0)
    except KeyboardInterrupt:
        print(f"vitops {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _gate_errors()):
            kind, code = "gate failed", EXIT_GATE
        elif isinstance(err, _user_errors()):
            kind, code = "error", EXIT_USAGE
        else:
            traceback.print_exc()
            print(f"vitops {args.command}: crashed: {type(err).__name__}: {err}", file=sys.stderr)
            return EXIT_CRASH
        if args.verbose:
            traceback.print_exc()
        print(f"vitops {args.command}: {kind}: {err}", file=sys.stderr)
        return code
