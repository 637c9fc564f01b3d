"""Replay a folder of line images against a vitops endpoint, as the station's camera would, one request each.

    python docs/examples/replay_line.py build/line-batch [--url http://127.0.0.1:8080] [--verdicts FILE.csv]

An endpoint with a token (`endpoint.token_env`) takes it from `--token` or the variable VITOPS_ENDPOINT_TOKEN.

Prints how many answers each route and version gave; exits 1 when a request was refused. With `--verdicts`, the
images under a class folder (`BATCH/<class>/...`, the labelled part of the quickstart's line batch) become
operators' verdicts in the CSV that `vitops feedback import` takes: the answer's sha256 and the folder's label.
Plain httpx; no vitops import.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
from pathlib import Path

import httpx

TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--verdicts", type=Path, help="write sha256,label,operator for the labelled images")
    parser.add_argument("--operator", default="qa-line-7")
    parser.add_argument("--token", default=os.environ.get("VITOPS_ENDPOINT_TOKEN"))
    args = parser.parse_args()
    images = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in TYPES)
    if not images:
        print(f"no PNG or JPEG files under {args.folder}", file=sys.stderr)
        return 2
    routes: collections.Counter[tuple[str, str]] = collections.Counter()
    verdicts, failed = [], 0
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30.0) as client:
        for path in images:
            r = client.post("/predict", content=path.read_bytes(), headers={"Content-Type": TYPES[path.suffix.lower()]})
            if r.status_code != 200:
                print(f"{path}: {r.status_code} {r.text}", file=sys.stderr)
                failed += 1
                continue
            answer = r.json()
            routes[(answer["route"], answer["version"])] += 1
            label = path.parent.name if path.parent != args.folder else "unlabelled"
            if label != "unlabelled":
                verdicts.append({"sha256": answer["sha256"], "label": label, "operator": args.operator})
    for (route, version), n in sorted(routes.items()):
        print(f"{n:5d} answers  route {route:8}  version {version}")
    if args.verdicts:
        with args.verdicts.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["sha256", "label", "operator"])
            writer.writeheader()
            writer.writerows(verdicts)
        print(f"{len(verdicts)} verdicts of labelled images in {args.verdicts}")
    if failed:
        print(f"{failed} of {len(images)} requests refused", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
