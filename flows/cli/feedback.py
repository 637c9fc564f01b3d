"""`vitops feedback`: operators' verdicts on the line's images, and the realized accuracy they give.

vitops feedback import FILE.csv [--operator NAME]
        append a CSV of verdicts (header sha256,label[,operator][,time]) to the prediction log; every row is checked
        first (sha256, label among the model's classes, operator, time, one row per image) and a bad row imports
        nothing (exit 2, naming the file, line and value)
vitops feedback accuracy [--since T] [--until T] [--model NAME] [--confidence 0.95]
        the realized accuracy of each version and route: logged answers joined with the latest verdict per image,
        with Wilson intervals

Times: 2026-12-04, 2026-12-04T10:00 (UTC), ISO with a zone, or an age such as 90m, 24h, 7d.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitops.flows.config import Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.deploy.prediction_log import LogError
    from vitops.flows.from_log import FeedbackCsvError

    return (FeedbackCsvError, LogError)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    feedback = sub.add_parser("feedback", help="operators' verdicts: import a CSV, realized accuracy")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")

    p = feedback_sub.add_parser("import", help="append a CSV of verdicts (sha256,label[,operator][,time]) to the log")
    p.add_argument("csv", type=Path, help="the CSV; its first line is the header")
    p.add_argument("--operator", default="", help="operator of the rows that name none")
    p.add_argument("--model", help="registered model whose champion's classes check the labels when data.classes "
                   "is empty (default: tracking.registered_model)")  # fmt: skip
    p.set_defaults(handler=cmd_import)

    p = feedback_sub.add_parser("accuracy", help="realized accuracy per version and route, with intervals")
    p.add_argument("--since", help="answers from this time (default: the whole log)")
    p.add_argument("--until", help="answers before this time (default: now)")
    p.add_argument("--model", help="only this registered model (default: all in the log)")
    p.add_argument("--confidence", type=_level, default=0.95, help="level of the intervals (default: 0.95)")
    p.set_defaults(handler=cmd_accuracy)


def _level(text: str) -> float:
    value = float(text)
    if not 0.5 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a confidence level in (0.5, 1), e.g. 0.95")
    return value


def cmd_import(args: argparse.Namespace, params: Params) -> int:
    """Check the CSV, append it, and say how much of it matches the log."""
    from vitops.flows.from_log import import_feedback, model_classes, read_feedback_csv
    from vitops.flows.settings import run_context

    if not args.csv.is_file():
        raise FileNotFoundError(f"{args.csv} does not exist: give a CSV with the header sha256,label[,operator][,time]")
    name = args.model or params.tracking.registered_model
    classes = model_classes(name, list(params.data.classes), run_context(params))
    if classes.names:
        print(f"labels checked against {classes.source}: {list(classes.names)}")
    else:
        print(f"labels not checked: {classes.source}")
    rows = read_feedback_csv(args.csv, classes.names, args.operator.strip())
    log_dir = params.prediction_log.dir
    done = import_feedback(rows, log_dir)
    print(f"{len(rows)} row(s) in {args.csv}: {done.appended} appended to {log_dir}, {done.matched} of them match "
          "logged predictions")  # fmt: skip
    if done.already:
        print(f"{done.already} row(s) were in the log already (the file was imported before): not appended again")
    return 0


def cmd_accuracy(args: argparse.Namespace, params: Params) -> int:
    """Print one line per (model, version, route)."""
    from vitops.deploy.prediction_log import parse_time, realized_accuracy

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    rows = realized_accuracy(params.prediction_log.dir, since, until, confidence=args.confidence, model=args.model)
    if not rows:
        print(f"no answers logged in {params.prediction_log.dir} for that window")
        return 0
    header = f"{'model':<24} {'version':>7} {'route':<8} {'answered':>8} {'labelled':>8}  top-1 on labelled"
    print(header)
    for r in rows:
        print(f"{r.model:<24} {r.version:>7} {r.route:<8} {r.answered:>8} {r.labelled:>8}  {r.accuracy.describe()}")
    return 0
