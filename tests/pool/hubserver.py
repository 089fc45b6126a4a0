"""A local HTTP server speaking enough of the Hugging Face hub's API for huggingface_hub.

- ``GET /api/models/{repo}[/revision/{rev}]`` -> model info with ``sha`` and ``siblings`` (sizes, LFS sha256)
- ``HEAD|GET /{repo}/resolve/{rev}/{file}`` -> the file, with ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, ``Accept-Ranges`` and ``Range`` support (206)

Faults, per file, for the first GET that is not a resume: ``drop_after[file] = n`` sends ``n`` bytes of
the body then closes the connection; ``stall_after[file] = n`` sends ``n`` bytes then hangs until the
server is released. Every request is logged as ``(method, path, range, authorization)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    token: str | None = None
    drop_after: dict[str, int] = field(default_factory=dict)
    stall_after: dict[str, int] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def add_repo(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = files

    def add_dir(self, repo: str, directory: Path, extra: dict[str, bytes] | None = None) -> None:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        # config.json first, so an interruption in the weights leaves whole files behind it
        ordered = dict(sorted(files.items(), key=lambda kv: (kv[0] != "config.json", kv[0])))
        self.add_repo(repo, ordered | (extra or {}))

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and r.path.endswith("/" + name)]

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return None

        def _record(self) -> str:
            path = unquote(urlsplit(self.path).path)
            hub.log.append(
                Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
            return path

        def _error(self, status: int, code: str | None = None) -> None:
            body = json.dumps({"error": code or "error"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            if hub.token is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def do_GET(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def _serve(self) -> None:
            path = self._record()
            if not self._authorized():
                self._error(401, "RepoNotFound")
                return
            if m := _INFO.match(path):
                self._info(m["repo"])
            elif m := _RESOLVE.match(path):
                self._file(m["repo"], m["file"])
            else:
                self._error(404)

        def _info(self, repo: str) -> None:
            files = hub.repos.get(repo)
            if files is None:
                self._error(404, "RepoNotFound")
                return
            siblings = []
            for name, data in files.items():
                sib: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": _oid(data)}
                if name.endswith((".safetensors", ".gguf")):
                    sha = hashlib.sha256(data).hexdigest()
                    sib["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
                siblings.append(sib)
            body = json.dumps(
                {
                    "_id": "x",
                    "id": repo,
                    "modelId": repo,
                    "sha": COMMIT,
                    "private": False,
                    "siblings": siblings,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo: str, name: str) -> None:
            data = hub.repos.get(repo, {}).get(name)
            if data is None:
                self._error(404, "EntryNotFound")
                return
            start = 0
            rng = self.headers.get("Range")
            if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
                start = int(m[1])
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _oid(data)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if not start and name in hub.drop_after:
                cut = hub.drop_after.pop(name)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if not start and name in hub.stall_after:
                cut = hub.stall_after.pop(name)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                hub.stalled.set()
                while not hub.release.wait(0.1):
                    time.sleep(0)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
