"""`vitops explain`: where a registered ViT looked, for any image (attention rollout heatmaps, `vit/explain.py`).

vitops explain NAME@ALIAS | NAME/VERSION | MODEL_DIR IMAGE... [--out explain.png] [--target CLASS]
        each image with the heatmap of the predicted (or the given) class, its prediction and confidence, as one
        picture grid; prints one line per image
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitops.flows.config import Params


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes of this group that are user mistakes (imported only when an error is being reported)."""
    from vitops.flows.tracking import TrackingError
    from vitops.vit.data import DataError
    from vitops.vit.explain import ExplainError

    return (ExplainError, TrackingError, DataError)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's subcommands to the `vitops` parser."""
    p = sub.add_parser("explain", help="heatmaps of where a registered ViT looked, for any image")
    p.add_argument("model", help="NAME@ALIAS, NAME/VERSION, or a model folder")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--out", type=Path, default=Path("explain.png"), help="the picture grid (default: explain.png)")
    p.add_argument("--target", help="the class every heatmap explains (default: each image's prediction)")
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace, params: Params) -> int:
    """Explain the images; 2 when an image is missing."""
    import sys
    import tempfile

    from vitops.flows import tracking
    from vitops.flows.review import explain_files
    from vitops.flows.settings import run_context

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"vitops explain: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vitops-explain-") as work:
        folder = Path(args.model)
        if not (folder / "model.json").is_file():
            run_context(params).configure()
            sep = "@" if "@" in args.model else "/"
            name, _, ref = args.model.rpartition(sep)
            uri = f"models:/{name}@{ref}" if sep == "@" else f"models:/{name}/{ref}"
            folder = tracking.download_model(uri, Path(work))
        answers = explain_files(folder, list(args.images), args.out, args.target)
    for a in answers:
        print(f"{a['path']}: {a['pred']} ({a['confidence'] * 100:.1f} %)")
    print(f"heatmaps {args.out}")
    return 0
