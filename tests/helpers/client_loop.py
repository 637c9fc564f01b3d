"""A client loop in its own process, for the endpoint's swap test: THREADS threads POST one image to /predict
over and over until STOP_FILE appears (or 120 s pass), and write one JSON line per request to OUT:
`{"thread", "t", "status", "version", "seconds"}`.

python tests/helpers/client_loop.py URL TOKEN IMAGE OUT STOP_FILE [THREADS]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx


def main(url: str, token: str, image: str, out: str, stop_file: str, threads: int = 3) -> None:
    data = Path(image).read_bytes()
    lock = threading.Lock()
    deadline = time.monotonic() + 120
    with open(out, "w") as fh:

        def loop(n: int) -> None:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                while not Path(stop_file).exists() and time.monotonic() < deadline:
                    start = time.monotonic()
                    try:
                        r = client.post("/predict", content=data)
                        status, version = r.status_code, r.json().get("version")
                    except Exception as err:  # a refused connection is a failure too
                        status, version = 0, repr(err)
                    row = {"thread": n, "t": start, "status": status, "version": version,
                           "seconds": time.monotonic() - start}  # fmt: skip
                    with lock:
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()

        workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


if __name__ == "__main__":
    main(*sys.argv[1:6], *(int(a) for a in sys.argv[6:7]))
