"""The worker's one settings model, built once in ``main`` from flags and environment."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from rbees.protocol import Backend, BearerToken, PoolName

TOKEN_ENV = "RBEES_WORKER_TOKEN"
CALLBACK_TOKEN_ENV = "RBEES_CALLBACK_TOKEN"
HOME_ENV = "RBEES_HOME"

WorkerId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=512)]


class WorkerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    worker_id: WorkerId
    model_path: Path
    port: int = Field(ge=1, le=65535)
    host: str = "127.0.0.1"
    backend: Backend = Backend.CPU
    gpu: int | None = Field(default=None, ge=0)
    model_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    callback_urls: tuple[Url, ...] = ()
    callback_token: BearerToken | None = None
    advertise_url: Url | None = None
    pool: PoolName | None = None
    slots: int = Field(default=1, ge=1, le=1024)
    token: BearerToken | None = None
    threads: int | None = Field(default=None, ge=1, le=1024)
    decode_nice: int = Field(default=5, ge=0, le=19)
    prefill_batch_tokens: int = Field(default=4096, ge=0, le=1_000_000)
    refill_wait: float | None = Field(default=None, ge=0, le=1)
    prefill_gather: float | None = Field(default=None, ge=0, le=1)
    drain_timeout_s: float = Field(default=10.0, ge=0, le=3600)
    cache_dir: Path | None = None

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def refill_share(self) -> float:
        """``--refill-wait``, else 0.125 on a GPU (a pass costs about the same for one row or many,
        so a request that joins the next pass is worth a few milliseconds) and 0 on a CPU."""
        if self.refill_wait is not None:
            return self.refill_wait
        return 0.0 if self.backend is Backend.CPU else 0.125

    @property
    def gather_share(self) -> float:
        """``--prefill-gather``, else 0.5 on a GPU (a prefill pass costs about the same for one prompt
        or sixteen) and 0 on a CPU (its cost grows with the prompts: nothing to gather for)."""
        if self.prefill_gather is not None:
            return self.prefill_gather
        return 0.0 if self.backend is Backend.CPU else 0.5

    @property
    def uri(self) -> str:
        """Where others reach this worker: ``--advertise-url``, else built from host and port."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rbees-workerd",
        description="Serve one model (Hugging Face directory or GGUF file) over HTTP: "
        "POST /execute streams tokens as server-sent events.",
    )
    p.add_argument("--worker-id", required=True, help="this worker's id (letters, digits, . _ : -)")
    p.add_argument("--model", required=True, type=Path, help="model directory or .gguf file")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.CPU.value)
    p.add_argument("--gpu", type=int, help="GPU index for cuda (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs a token)")
    p.add_argument("--model-id", help="name reported as model / model_ref (default: dir name or GGUF stem)")
    p.add_argument(
        "--callback-url",
        action="append",
        default=[],
        help="POSTed the ready payload once loaded (repeatable)",
    )
    p.add_argument("--callback-token", help=f"bearer token for the callback (env {CALLBACK_TOKEN_ENV})")
    p.add_argument("--advertise-url", help="the uri put in the callback (default http://<host>:<port>)")
    p.add_argument("--pool", help="pool name put in the callback")
    p.add_argument("--slots", type=int, default=1, help="requests served at once (default 1)")
    p.add_argument("--token", help=f"bearer token required on /execute and /cancel (env {TOKEN_ENV})")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--decode-nice",
        type=int,
        default=5,
        help="how many nice steps below the worker's event loop the decode thread runs (Linux; "
        "0: the same), so admitting requests and writing tokens never wait behind decoding (default 5)",
    )
    p.add_argument(
        "--prefill-batch-tokens",
        type=int,
        default=4096,
        metavar="N",
        help="prompts that arrive together are prefilled in one forward pass of at most N padded tokens "
        "(0: each on its own; default 4096)",
    )
    p.add_argument(
        "--refill-wait",
        type=float,
        metavar="F",
        help="when a job ends, the running jobs wait up to F times the last prefill's time (5 ms at most) "
        "for a request to take its slot, so it joins the next pass (default 0.125 on a GPU, 0 on a CPU)",
    )
    p.add_argument(
        "--prefill-gather",
        type=float,
        metavar="F",
        help="an idle worker that receives a request waits while more keep arriving (a burst), up to F "
        "times its last prefill's time (20 ms at most), to prefill them together; a lone request waits "
        "1 ms for a second (default 0.5 on a GPU, 0 on a CPU)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds running jobs get to finish on SIGTERM"
    )
    p.add_argument(
        "--cache-dir", type=Path, help=f"where converted GGUF models are cached (default ${HOME_ENV}/cache)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not cache converted GGUF models")
    return p


def settings_from_args(argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
    """Parse flags, fill the rest from the environment, validate once. Errors raise ``ValueError``."""
    args = build_parser().parse_args(argv)
    home = Path(environ.get(HOME_ENV) or Path.home() / ".rbees").expanduser()
    cache_dir = None if args.no_cache else (args.cache_dir or home / "cache")
    return WorkerSettings(
        worker_id=args.worker_id,
        model_path=args.model,
        port=args.port,
        host=args.host,
        backend=Backend(args.backend),
        gpu=args.gpu,
        model_id=args.model_id,
        callback_urls=tuple(args.callback_url),
        callback_token=args.callback_token or environ.get(CALLBACK_TOKEN_ENV) or None,
        advertise_url=args.advertise_url,
        pool=args.pool,
        slots=args.slots,
        token=args.token or environ.get(TOKEN_ENV) or None,
        threads=args.threads,
        decode_nice=args.decode_nice,
        prefill_batch_tokens=args.prefill_batch_tokens,
        refill_wait=args.refill_wait,
        prefill_gather=args.prefill_gather,
        drain_timeout_s=args.drain_timeout,
        cache_dir=cache_dir,
    )
