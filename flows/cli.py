"""The `vitops` command line: one subcommand per pipeline stage, each a thin caller of `flows.stages`.

Run `vitops --help`. Every command reads `params.yaml` (or `--params FILE`); the flags a command offers
override single values from it. Each command group lives in its own module and registers itself here:
`data_commands` (sample, import, validate), `train_commands` (pretrain-standin, train, evaluate),
`engine_commands` (export, build, bench), `registry_commands` (gate, register, promote, rollback, history,
lineage), `flow_commands` (retrain, serve) and `pilot_commands` (pilot, approve).

Exit codes, the same for every command: 0 ok; 1 a gate said no (data gate, parity gate, KPI gate); 2 a usage
or configuration error, with one message; 3 a crash, with its traceback. `-v` adds debug logging and the
traceback of every error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from flows import data_commands, engine_commands, flow_commands, pilot_commands, registry_commands, train_commands
from flows.config import DEFAULT_PARAMS, ParamsError, load_params

_GROUPS = (data_commands, train_commands, engine_commands, registry_commands, flow_commands, pilot_commands)

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: printed as one message without a traceback, exit code 2.

    Each command group names the error classes of the core functions it calls in `user_errors()`; they are
    imported only when an error is being reported, so `vitops validate` never pays for importing torch.
    """
    errors: tuple[type[BaseException], ...] = (ParamsError, FileNotFoundError, NotADirectoryError)
    for group in _GROUPS:
        errors += group.user_errors()
    return errors


def _gate_errors() -> tuple[type[BaseException], ...]:
    """Errors that are a gate saying no (exit 1): the parity gates of the engine builds."""
    from deploy.parity import ParityError

    return (ParityError,)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vitops", description=__doc__.splitlines()[0])
    parser.add_argument("--params", help="parameter file (default: params.yaml, which may be absent)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vitops` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own INFO lines, the libraries' warnings only (their INFO chatter is noise nobody asked for); -v: all.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for package in ("common", "data_checks", "vit", "deploy", "flows"):
            logging.getLogger(package).setLevel(logging.INFO)
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


if __name__ == "__main__":
    sys.exit(main())
