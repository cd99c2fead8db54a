"""A loopback stand-in for the Hugging Face Hub's file endpoints (HEAD/GET ``/<repo>/resolve/<rev>/<file>``).

Serves byte strings from a dict, honours ``Range: bytes=N-``, records every request, and can stall
the first GET of chosen files after half of its bytes (a download that dies midway, to be resumed).
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, files: dict[str, bytes], stall: tuple[str, ...] = ()) -> None:
        self.files = files  # "owner/repo/filename" -> bytes
        self.stall = set(stall)  # keys whose first GET hangs after half of the bytes
        self._release = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._cut_done: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _lookup(self):
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    return "/".join(parts[:2] + parts[4:])
                return None

            def _headers(self, key, body, status, start=0):
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()

            def _handle(self, send_body):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                key = self._lookup()
                if key not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = hub.files[key]
                start = 0
                rng = self.headers.get("Range")
                if send_body and rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-", 1)[0])
                self._headers(key, body, 206 if start else 200, start)
                if not send_body:
                    return
                if key in hub.stall and key not in hub._cut_done:
                    hub._cut_done.add(key)
                    self.wfile.write(body[start : start + len(body) // 2])
                    self.wfile.flush()
                    hub._release.wait(60)  # hang like a dead link until the test is done
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def do_HEAD(self):
                self._handle(False)

            def do_GET(self):
                self._handle(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
