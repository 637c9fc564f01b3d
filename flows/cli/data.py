"""`vitops` commands of the data stage: sample data, DVC-versioned import, data versions, and the validation gate.

vitops data sample OUT [--size N]           write the handwritten-digits sample as an ImageFolder
vitops data sample-batch OUT [--labelled-share 0.5]
                                            write the quickstart's pilot batch: new images from the line
vitops data import SRC [--remote URL] [--no-push] [--no-git-commit]
                                            copy an ImageFolder into data.raw_dir as a new DVC data version
vitops data from-log --since T [--until T] [--out DIR] [--limit N] [--no-import] [--no-push]
                                            the labelled logged images (operators' feedback, kept images;
                                            disagreements first) as an ImageFolder, then through the data gate
                                            into a new data version beside the current data; exit 1 when the
                                            gate fails (the data version stays as it was)
vitops data version                         print the current data version (the tracked folder's hash)
vitops data versions                        list the committed data versions, newest first
vitops data checkout REV                    bring back the data version committed at git revision REV
vitops data pull                            fetch the current data version from the remote
vitops validate [DATA] [--report FILE] [--manifest FILE] [--reference MANIFEST]
                                            run the gate; exit 0 when it passes, 1 when it fails
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vitops.flows.config import Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.data_checks.batch import BatchError
    from vitops.data_checks.manifest import LayoutError
    from vitops.data_checks.sample import SampleError
    from vitops.deploy.prediction_log import LogError
    from vitops.flows.from_log import FromLogError
    from vitops.flows.versioning import VersioningError

    return (BatchError, LayoutError, SampleError, VersioningError, LogError, FromLogError)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    data = sub.add_parser("data", help="sample data, import and DVC data versions")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = data_sub.add_parser("sample", help="write scikit-learn's handwritten digits as an ImageFolder")
    p.add_argument("out", type=Path, help="folder to write (empty, new, or an earlier sample)")
    p.add_argument("--size", type=int, default=None, help="number of images (default: all 1797)")
    p.add_argument("--img-size", type=int, default=32, help="side of the PNGs in pixels (default: 32)")
    p.set_defaults(handler=cmd_sample)

    p = data_sub.add_parser(
        "sample-batch", help="write a pilot batch: held-out digits with a slight shift, part of them labelled"
    )
    p.add_argument("out", type=Path, help="folder to write (empty, new, or an earlier batch)")
    p.add_argument("--labelled-share", type=float, default=0.5, help="share of images in class folders (default: 0.5)")
    p.add_argument("--img-size", type=int, default=32, help="side of the PNGs in pixels; the sample's (default: 32)")
    p.set_defaults(handler=cmd_sample_batch)

    p = data_sub.add_parser("import", help="copy an ImageFolder into data.raw_dir, dvc add, push, git commit")
    p.add_argument("src", type=Path, help="SRC/<label>/... or SRC/{train,val,test}/<label>/...; never modified")
    p.add_argument("--remote", help="DVC remote URL (default: data.remote in params.yaml)")
    p.add_argument("--no-push", action="store_true", help="do not push to the remote")
    p.add_argument("--no-git-commit", action="store_true", help="do not commit the .dvc file")
    p.set_defaults(handler=cmd_import)

    p = data_sub.add_parser(
        "from-log", help="labelled images of the prediction log -> an ImageFolder -> the data gate -> a data version"
    )
    p.add_argument("--since", required=True, help="logged from this time: 2026-12-04, 2026-12-04T10:00, 24h, 7d")
    p.add_argument("--until", help="logged before this time (default: now)")
    p.add_argument("--out", type=Path, help="new or empty folder to write (default: build/from-log/<UTC time>)")
    p.add_argument("--limit", type=_positive, help="at most this many images, disagreements first, then the least "
                   "confident")  # fmt: skip
    p.add_argument("--no-import", action="store_true", help="only write the ImageFolder")
    p.add_argument("--no-push", action="store_true", help="do not push the new data version to the remote")
    p.set_defaults(handler=cmd_from_log)

    p = data_sub.add_parser("version", help="print the current DVC data version")
    p.set_defaults(handler=cmd_version)
    p = data_sub.add_parser("versions", help="list the committed data versions, newest first")
    p.set_defaults(handler=cmd_versions)
    p = data_sub.add_parser("checkout", help="bring back the data version committed at a git revision")
    p.add_argument("rev", help="git revision (commit, tag, HEAD~1) from `vitops data versions`")
    p.set_defaults(handler=cmd_checkout)
    p = data_sub.add_parser("pull", help="fetch the current data version from the remote")
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser("validate", help="scan a dataset into a manifest and run the Great Expectations gate")
    p.add_argument("data", type=Path, nargs="?", help="dataset folder (default: data.raw_dir)")
    p.add_argument("--report", type=Path, help="JSON report (default: validate.report); Data Docs go beside it")
    p.add_argument("--manifest", type=Path, help="manifest CSV to write (default: validate.manifest)")
    p.add_argument("--reference", type=Path, help="manifest of an earlier version, for drift warnings")
    p.add_argument("--workers", type=int, help="scanner processes (default: validate.workers; 0 = CPU count)")
    p.set_defaults(handler=cmd_validate)


def cmd_sample(args: argparse.Namespace, params: Params) -> int:
    """Write the digits sample."""
    from vitops.data_checks.sample import write_sample

    written = write_sample(args.out, size=args.size, img_size=args.img_size)
    labels = {p.parent.name for p in written}
    print(f"wrote {len(written)} images in {len(labels)} classes to {args.out}")
    return 0


def cmd_sample_batch(args: argparse.Namespace, params: Params) -> int:
    """Write the line batch, its bases held out of the sample's train split as params.yaml splits it."""
    from vitops.data_checks.batch import UNLABELLED
    from vitops.data_checks.sample import write_line_batch

    written = write_line_batch(
        args.out, img_size=args.img_size, labelled_share=args.labelled_share, fractions=params.data.split.model_dump()
    )
    unlabelled = sum(p.parent.name == UNLABELLED for p in written)
    labels = {p.parent.name for p in written} - {UNLABELLED}
    print(
        f"wrote {len(written)} images to {args.out}: {len(written) - unlabelled} labelled in {len(labels)} class "
        f"folders, {unlabelled} in {UNLABELLED}/"
    )
    return 0


def cmd_import(args: argparse.Namespace, params: Params) -> int:
    """Import an ImageFolder as a new data version."""
    from vitops.flows.versioning import import_images

    result = import_images(
        args.src,
        params.data.raw_dir,
        remote=args.remote or params.data.remote,
        remote_name=params.data.remote_name,
        push=not args.no_push,
        git_commit=not args.no_git_commit,
    )
    for skipped in result.skipped:
        print(f"warning: not imported: {skipped}", file=sys.stderr)
    print(f"copied {result.copied} new file(s), {result.identical} already present")
    print(f"data version {result.version}" + (f" (commit {result.commit[:10]})" if result.commit else ""))
    if result.pushed:
        print(f"pushed to remote '{params.data.remote_name}'")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of images")
    return value


def cmd_from_log(args: argparse.Namespace, params: Params) -> int:
    """Write the labelled logged images and make them a data version; 1 when the data gate fails."""
    import time

    from vitops.deploy.prediction_log import parse_time
    from vitops.flows.from_log import data_from_log, select_labelled

    if not args.verbose:  # GX logs its internals at INFO (and pins some of its loggers to INFO)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_gx)
    since = parse_time(args.since)
    until = parse_time(args.until) if args.until else None
    log_dir = params.prediction_log.dir
    out = args.out or Path("build/from-log") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    selection = select_labelled(log_dir, since, until, args.limit, tuple(params.data.classes))
    for label, count in sorted(selection.bad_labels.items()):
        print(f"warning: {count} image(s) labelled {label!r} left out: not a class of data.classes "
              f"{list(params.data.classes)} (or not a usable folder name)", file=sys.stderr)  # fmt: skip
    if selection.not_kept:
        print(f"{selection.not_kept} labelled image(s) were not kept in {log_dir}/images "
              "(prediction_log.keep_images, keep_below_confidence): they cannot join the data")  # fmt: skip
    result = data_from_log(selection, out, params.data, params.validate_, not args.no_import, not args.no_push)
    disagreements = sum(i.disagreement for i in selection.images)
    print(
        f"wrote {len(result.written)} labelled image(s) to {out} ({disagreements} disagreement(s) first, then "
        "the least confident)" + (f"; {selection.left_out} more left out by --limit" if selection.left_out else "")
    )
    if args.no_import or not result.written:
        if not result.written:
            print("no labelled, kept images in that window: nothing to import")
        return 0
    if result.already_in_data:
        print(f"{result.already_in_data} of them are in data version {result.version_before} already (same "
              "bytes): not added twice")  # fmt: skip
    if result.gate is None:
        print(f"data version {result.version_before} unchanged: every image is in it already")
        return 0
    counts = result.gate.counts
    for line in result.gate.failures:
        print(f"FAIL: {line}")
    for line in result.gate.warnings:
        print(f"warning: {line}")
    if not result.passed:
        print(f"data gate FAILED on the current data plus the new images ({counts['files']} files); data version "
              f"{result.version_before} unchanged; report {result.gate.report_path}")  # fmt: skip
        return 1
    imported = result.imported
    print(f"data gate passed: {counts['files']} files, {counts['usable']} usable; report {result.gate.report_path}")
    print(f"copied {imported.copied} new file(s) into {params.data.raw_dir}")
    print(f"data version {imported.version}" + (f" (commit {imported.commit[:10]})" if imported.commit else "")
          + f", was {result.version_before}")  # fmt: skip
    if imported.pushed:
        print(f"pushed to remote '{params.data.remote_name}'; the next retrain trains on it")
    return 0


def cmd_version(args: argparse.Namespace, params: Params) -> int:
    """Print the data version."""
    from vitops.flows.versioning import data_version

    version = data_version(params.data.raw_dir)
    if version is None:
        print(f"{params.data.raw_dir} is not tracked yet: run `vitops data import SRC`", file=sys.stderr)
        return 1
    print(version)
    return 0


def cmd_versions(args: argparse.Namespace, params: Params) -> int:
    """List data versions."""
    from vitops.flows.versioning import data_version, list_versions

    current = data_version(params.data.raw_dir)
    versions = list_versions(params.data.raw_dir)
    if not versions:
        print("no committed data versions yet: run `vitops data import SRC`")
    for v in versions:
        mark = "*" if v.version == current else " "
        files = "?" if v.files is None else v.files
        print(f"{mark} {v.commit[:10]}  {v.date}  {v.version}  {files:>6} files  {v.subject}")
    return 0


def cmd_checkout(args: argparse.Namespace, params: Params) -> int:
    """Check out a data version."""
    from vitops.flows.versioning import checkout_version

    version = checkout_version(params.data.raw_dir, args.rev, params.data.remote, params.data.remote_name)
    print(f"{params.data.raw_dir} now holds data version {version} (from {args.rev})")
    return 0


def cmd_pull(args: argparse.Namespace, params: Params) -> int:
    """Pull the current data version."""
    from vitops.flows.versioning import pull_data

    version = pull_data(params.data.raw_dir, params.data.remote, params.data.remote_name)
    print(f"{params.data.raw_dir} holds data version {version}")
    return 0


def cmd_validate(args: argparse.Namespace, params: Params) -> int:
    """Run the data gate; 0 when it passes, 1 when it fails."""
    if not args.verbose:  # GX logs its internals at INFO (and pins some of its loggers to INFO)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_gx)

    from vitops.flows.validation import validate

    result = validate(
        Path(args.data or params.data.raw_dir),
        params.validate_,
        params.data,
        report=args.report,
        manifest=args.manifest,
        reference=args.reference,
        workers=args.workers,
    )
    counts = result.counts
    for item in result.rejected[:20]:
        print(f"rejected: {item['path']}: {item['reason']}")
    if len(result.rejected) > 20:
        print(f"... and {len(result.rejected) - 20} more (see the report)")
    for line in result.failures:
        print(f"FAIL: {line}")
    for line in result.warnings:
        print(f"warning: {line}")
    verdict = "passed" if result.passed else "FAILED"
    print(
        f"gate {verdict}: {counts['files']} files, {counts['usable']} usable, {counts['rejected']} rejected; "
        f"report {result.report_path}; data docs {result.data_docs}"
    )
    return 0 if result.passed else 1


def _quiet_gx(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith("great_expectations")
