"""A stand-in for rbees-workerd that follows its command-line contract, for failure modes a real
worker cannot be made to show on demand (never ready, ignoring SIGTERM, leaving children behind).

``STUB_MODE``: ``ok`` (default), ``exit`` (fails to load: message, exit 2), ``hang`` (loads forever),
``ignore-term`` (ready, but ignores SIGTERM), ``child`` (ready, with a child process in its group).
``STUB_CALLS`` (a file) gets one JSON line per received argv, for assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker-id", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--gpu", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-id")
    p.add_argument("--callback-url", action="append", default=[])
    p.add_argument("--advertise-url")
    p.add_argument("--pool")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--prefill-batch-tokens", type=int)
    p.add_argument("--refill-wait", type=float)
    p.add_argument("--prefill-gather", type=float)
    args = p.parse_args()
    mode = os.environ.get("STUB_MODE", "ok")
    if os.environ.get("STUB_CALLS"):
        with open(os.environ["STUB_CALLS"], "a") as f:
            f.write(
                json.dumps(
                    {
                        "argv": sys.argv[1:],
                        "token": os.environ.get("RBEES_WORKER_TOKEN"),
                        "callback_token": os.environ.get("RBEES_CALLBACK_TOKEN"),
                    }
                )
                + "\n"
            )
    if mode == "exit":
        print(f"error: cannot load model {args.model}: not a model", file=sys.stderr, flush=True)
        sys.exit(2)
    state = {"status": "loading"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {
                    "status": state["status"],
                    "worker_id": args.worker_id,
                    "model": args.model_id,
                    "backend": args.backend,
                    "device": "cpu",
                    "slots_total": args.slots,
                    "slots_busy": 0,
                    "uptime_s": 1.0,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: object) -> None:
            return None

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"stub worker {args.worker_id} listening on {args.host}:{args.port}", flush=True)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: (server.shutdown(), sys.exit(0)))
    if mode == "child":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if mode == "hang":
        while True:
            time.sleep(1)
    time.sleep(float(os.environ.get("STUB_LOAD_S", "0.3")))
    state["status"] = "healthy"
    reg = {
        "worker_id": args.worker_id,
        "uri": args.advertise_url or f"http://{args.host}:{args.port}",
        "model_ref": args.model_id or "m",
        "backend": args.backend,
        "device": "cpu",
        "gpu": args.gpu,
        "vram_bytes": 0,
        "slots_total": args.slots,
        "pool": args.pool,
    }
    token = os.environ.get("RBEES_CALLBACK_TOKEN")
    for url in args.callback_url:
        headers = {"Content-Type": "application/json"} | (
            {"Authorization": f"Bearer {token}"} if token else {}
        )
        req = urllib.request.Request(url, data=json.dumps(reg).encode(), headers=headers, method="POST")
        try:
            urllib.request.urlopen(req, timeout=5).close()
        except OSError as exc:
            print(f"callback to {url} failed: {exc}", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
