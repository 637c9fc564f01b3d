"""`vitops` commands of the KPI gate and the model registry.

vitops gate [MODEL_DIR] [--no-tracking]
        the three-KPI gate against the champion (or the CNN baseline); prints the KPI table, writes the report;
        exit 1 when it fails
vitops register [MODEL_DIR]
        a new version of `tracking.registered_model` with the gate's verdict; alias `candidate` when it passed
vitops promote NAME --version N [--alias champion] [--expect M|none] [--override-gate --reason TEXT]
        a checked alias move: refused when the alias no longer points at M, or the version failed its gate
vitops rollback NAME [--alias champion] [--reason TEXT]
        put back the version that held the alias before
vitops history NAME [--alias A] [--json] [--migrate]
        every alias move: alias, from, to, when, who, reason, approval
vitops lineage NAME@ALIAS | NAME/VERSION
        data version, training run, evaluation, KPI verdict, engines and alias moves of one version
vitops verify NAME@ALIAS | NAME/VERSION
        download the version afresh and check every file and record against its manifest; exit 1 when one differs
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vitops.flows import access, aliases, artifacts, registry
from vitops.flows.config import Params, params_hash
from vitops.flows.settings import model_folder, run_context


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.deploy.kpi import KpiError
    from vitops.flows.gate import GateInputError
    from vitops.flows.registry import RegistryError
    from vitops.flows.tracking import TrackingError

    return (RegistryError, GateInputError, KpiError, TrackingError)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser("gate", help="the three-KPI gate of the trained candidate; exit 1 when it fails")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(handler=cmd_gate)

    p = sub.add_parser("register", help="register the gated candidate; alias `candidate` when its gate passed")
    p.add_argument("model_dir", nargs="?", help="model folder (default: train.out_dir/model)")
    p.set_defaults(handler=cmd_register)

    p = sub.add_parser("promote", help="move an alias (champion by default) to a version, checked")
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", required=True, help="version number to point the alias at")
    p.add_argument("--alias", default="champion", help="candidate | pilot | champion (default: champion)")
    p.add_argument("--expect", help="the version the alias must point at now, or `none`; default: as read now")
    p.add_argument("--override-gate", action="store_true", help="promote a version whose KPI gate failed")
    admin = "move champion outside a pilot, without its approval (the admin path; needs --reason)"
    p.add_argument("--override-pilot", action="store_true", help=admin)
    p.add_argument("--reason", default="", help="why; required with the overrides; recorded in the history")
    p.set_defaults(handler=cmd_promote)

    p = sub.add_parser("rollback", help="put back the version that held the alias before")
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", default="champion", help="default: champion")
    p.add_argument("--reason", default="rollback", help="recorded in the history")
    p.set_defaults(handler=cmd_rollback)

    p = sub.add_parser("history", help="every alias move of a registered model")
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", help="only this alias")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--migrate", action="store_true",
                   help="first move the entries an older vitops kept as registered models NAME.history.* into the "
                   "ledger experiment (once every mover runs this vitops)")  # fmt: skip
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser("lineage", help="where one version came from: data, training, evaluation, gate, engines")
    p.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")
    p.set_defaults(handler=cmd_lineage)

    p = sub.add_parser("verify", help="check every file of a version against its manifest; exit 1 when one differs")
    p.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    p.set_defaults(handler=cmd_verify)


def cmd_gate(args: argparse.Namespace, params: Params) -> int:
    """Apply the KPI gate; 0 when it passes, 1 when it fails."""
    from vitops.flows.gate import GateInputs, GateSettings, gate

    model_dir = model_folder(args.model_dir, params)
    inputs, settings = GateInputs.from_params(params), GateSettings.from_params(params)
    result = gate(model_dir, inputs, settings, run_context(params), track=not args.no_tracking)
    ref = f"{result.reference_kind} v{result.reference_version}" if result.reference_version else result.reference_kind
    print(f"KPIs of {result.candidate.label} against the {ref}:")
    print(result.table)
    for line in result.decision.reasons():
        print(f"  {line}")
    run = f"; MLflow run {result.run_id}" if result.run_id else ""
    print(f"report {result.report[0]}{run}")
    return 0 if result.passed else 1


def cmd_register(args: argparse.Namespace, params: Params) -> int:
    """Register the candidate."""
    from vitops.flows.registration import RegisterInputs, register

    inputs = RegisterInputs.from_params(params)
    model_dir = model_folder(args.model_dir, params)
    result = register(model_dir, inputs, params.tracking.registered_model, params_hash(params), run_context(params))
    verdict = "passed" if result.gate_passed else "FAILED"
    alias = "; alias candidate -> this version" if result.candidate else "; no alias (the gate failed)"
    print(f"registered {result.name} version {result.version} (KPI gate {verdict}){alias}")
    return 0


def _configure(params: Params) -> None:
    run_context(params).configure()


def cmd_promote(args: argparse.Namespace, params: Params) -> int:
    """Checked alias move."""
    if args.alias == "champion" and not args.override_pilot:
        raise registry.RegistryError(
            f"champion of {args.name} moves through a pilot (vitops pilot promote, then vitops approve), which checks "
            "the shadow and canary records and asks an approval. To move it outside a pilot (the admin path), pass "
            "--override-pilot --reason TEXT: the history records the move as an override"
        )
    if args.override_pilot and args.alias != "champion":
        raise registry.RegistryError(f"--override-pilot is for champion; {args.alias} moves without it")
    for flag, given in (("--override-gate", args.override_gate), ("--override-pilot", args.override_pilot)):
        if given and not args.reason.strip():
            raise registry.RegistryError(f"{flag} needs --reason TEXT: the override is recorded with its reason")
    _configure(params)
    if args.override_pilot:
        access.require_manage(args.name, "move champion outside a pilot")
    record = aliases.move_alias(
        args.name,
        args.alias,
        args.version,
        expect=args.expect,
        reason=args.reason or f"promote to {args.alias}",
        override_gate=args.override_gate,
        note=aliases.PILOT_OVERRIDE if args.override_pilot else "",
    )
    print(f"{args.name}@{record.alias}: {_v(record.from_version)} -> {_v(record.to_version)} (move {record.seq})")
    if record.note:
        print(f"  {record.note}")
    return 0


def cmd_rollback(args: argparse.Namespace, params: Params) -> int:
    """Put back the previous holder of the alias."""
    _configure(params)
    access.require_manage(args.name, f"roll back {args.alias}")  # where the server authenticates
    record = aliases.rollback(args.name, args.alias, reason=args.reason)
    print(f"{args.name}@{record.alias}: rolled back {_v(record.from_version)} -> {_v(record.to_version)}")
    return 0


def cmd_history(args: argparse.Namespace, params: Params) -> int:
    """Print the alias history."""
    from dataclasses import asdict

    _configure(params)
    if args.migrate:
        moved = aliases.migrate_history(args.name)
        print(f"{args.name}: moved {moved} history entries into the experiment {aliases.LEDGER}", file=sys.stderr)
    records = aliases.history(args.name, args.alias)
    if args.json:
        for record in records:
            print(json.dumps(asdict(record), sort_keys=True))
        return 0
    if not records:
        print(f"{args.name}: no alias moves yet")
        return 0
    rows = [["#", "alias", "from", "to", "when (UTC)", "who", "flow run", "reason", "approval"]]
    for r in records:
        approval = r.approval.get("approver", "yes") if r.approval else ""
        who = f"{r.user}@{r.host}"
        reason = r.reason + (" [gate override]" if r.override else "") + ("" if r.completed else " [not completed]")
        reason += " [pilot override]" if aliases.PILOT_OVERRIDE in r.note else ""
        rows.append([str(r.seq), r.alias, _v(r.from_version), _v(r.to_version), r.time, who, r.flow_run_id or "-",
                     reason, approval])  # fmt: skip
    print(_table(rows))
    return 0


def cmd_lineage(args: argparse.Namespace, params: Params) -> int:
    """Print the lineage of one version."""
    _configure(params)
    name, ref = _split_ref(args.ref)
    info = aliases.lineage(name, ref)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    print(_format_lineage(info))
    return 0


def cmd_verify(args: argparse.Namespace, params: Params) -> int:
    """Check a version against its manifest; 0 when intact, 1 when a file or record differs."""
    _configure(params)
    name, ref = _split_ref(args.ref)
    try:
        info, files = artifacts.verify_version(name, ref)
    except registry.ArtifactCheckError as err:
        print(f"vitops verify: {args.ref} REFUSED: {err}", file=sys.stderr)
        return 1
    digest = info.tags[registry.MANIFEST_TAG]
    print(f"{name} version {info.version}: all {files} files match its manifest (sha256 {digest[:12]}...), and its "
          f"records are as registered by {info.tags.get(registry.REGISTERED_BY_TAG, 'unknown')}")  # fmt: skip
    return 0


def _split_ref(text: str) -> tuple[str, str]:
    from vitops.flows.registry import RegistryError

    for sep in ("@", "/"):
        if sep in text:
            name, ref = text.rsplit(sep, 1)
            if name and ref:
                return name, ref
    raise RegistryError(f"{text!r}: name a version as NAME@ALIAS (e.g. vitops-vit@champion) or NAME/VERSION")


def _format_lineage(info: dict[str, Any]) -> str:
    """The chain of one version, section by section: data, training, evaluation, gate, engines, alias moves."""
    v = info["version"]
    tags = v["tags"]
    run = info.get("train_run") or info.get("run") or {}
    params = run.get("params", {})
    metrics = run.get("metrics", {})
    aliases = ", ".join(v["aliases"]) or "none"
    lines = [f"{v['name']} version {v['version']} (aliases: {aliases}; registered {v['created']})"]
    lines += [
        "data:",
        f"  version {tags.get('data_version', '?')} (DVC hash of the training data)",
        f"  validation report {tags.get('validation.report', 'not recorded')}",
        f"  {tags.get('validation.summary', '')}".rstrip(),
        "training:",
        f"  run {run.get('run_id', v['run_id'])}, git {tags.get('git_commit', '?')}, "
        f"params {tags.get('params_hash', '?')}",
        "  " + ", ".join(f"{k}={params[k]}" for k in sorted(params) if k in _KEY_PARAMS),
        "evaluation:",
        "  " + ", ".join(f"{k} {metrics[k]:.4f}" for k in sorted(metrics) if k in _KEY_METRICS),
        f"KPI gate: {'passed' if tags.get('gate.passed') == 'true' else 'FAILED'} "
        f"against {tags.get('gate.reference', '?')}",
    ]
    lines += [f"  {reason}" for reason in (tags.get("gate.reasons") or "").splitlines()]
    lines.append("  " + ", ".join(f"{k} {tags[k]}" for k in sorted(tags) if k.startswith("kpi.") and k in _KEY_KPIS))
    lines.append("engines:")
    for e in info.get("engines", []):
        p50 = f"p50 {e['p50_ms']:.3f} ms" if e.get("p50_ms") is not None else "not timed"
        lines.append(f"  {e.get('file')}  {e.get('target')} {e.get('precision')}  {p50}  sha256 {e.get('sha256')}")
    onnx = (info.get("serving") or {}).get("onnx")
    if onnx:
        lines.append(f"  {onnx.get('file')}  onnx export  sha256 {onnx.get('sha256')}")
    lines.append("alias moves:")
    for m in info.get("moves", []):
        lines.append(
            f"  #{m['seq']} {m['alias']}: {_v(m['from_version'])} -> {_v(m['to_version'])}  {m['time']}  "
            f"{m['user']}@{m['host']}  {m['reason']}" + (" [gate override]" if m.get("override") else "")
        )
    return "\n".join(line for line in lines if line.strip())


_KEY_PARAMS = {"model", "source", "teacher", "epochs", "lr", "batch_size", "img_size", "train_images", "device"}
_KEY_METRICS = {"test_top1", "test_macro_f1", "test_ece", "best_val_top1", "train_seconds"}
_KEY_KPIS = {"kpi.top1", "kpi.uplift_points", "kpi.latency_p95_ms", "kpi.monthly_tco", "kpi.serving_per_million"}


def _v(version: str | None) -> str:
    return "none" if version in (None, "", "none") else f"v{version}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
