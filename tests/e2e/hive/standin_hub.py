"""A stand-in for the Hugging Face Hub's file endpoints, run as its own process by the tests.

Serves `HEAD|GET /{org}/{repo}/resolve/{revision}/{path}` from `--root/{org}/{repo}/{path}` with
the headers huggingface_hub reads (Content-Length, ETag = SHA-256, X-Repo-Commit), and the
X-Error-Code it maps to its RepositoryNotFound/EntryNotFound errors; `GET /files/{path}` serves
`--root/files/{path}` as a plain web server would (no Hub headers but Content-Length). Both
honour `Range: bytes=N-` (206). Behaviours keyed by file name so a test needs no side channel:
  - a name containing `stall` sends its first 64 KiB, then nothing more until the client leaves;
  - a name containing `corrupt` announces a SHA-256 that does not match its bytes;
  - a name containing `cut` breaks the connection after half of the file when asked for it
    from the start (a network that drops); a range is served whole.

    python standin_hub.py --port 8123 --root DIR
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Handler(BaseHTTPRequestHandler):
    root: Path
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _fail(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, *, body: bool) -> None:
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        if parts[0] == "files" and ".." not in parts:
            path = self.root.joinpath(*parts)
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(path, body=body, hub=False)
            return
        if len(parts) < 5 or parts[2] != "resolve" or ".." in parts:
            self._fail("RepoNotFound")
            return
        repo = self.root / parts[0] / parts[1]
        path = repo.joinpath(*parts[4:])
        if not repo.is_dir():
            self._fail("RepoNotFound")
            return
        if not path.is_file():
            self._fail("EntryNotFound")
            return
        self._send(path, body=body, hub=True)

    def _send(self, path: Path, *, body: bool, hub: bool) -> None:
        data = path.read_bytes()
        first = 0
        asked = self.headers.get("Range", "")
        if asked.startswith("bytes=") and asked.endswith("-") and body:
            first = int(asked[6:-1])
            if first >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if first else 200)
        self.send_header("Content-Length", str(len(data) - first))
        if first:
            self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
        if hub:
            digest = hashlib.sha256(b"other" if "corrupt" in path.name else data).hexdigest()
            self.send_header("ETag", f'"{digest}"')
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not body:
            return
        cut_at = len(data) // 2 if "cut" in path.name and not first else None
        for start in range(first, len(data), CHUNK):
            if cut_at is not None and start >= cut_at:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data[start : start + CHUNK])
            self.wfile.flush()
            if "stall" in path.name:
                self._stall()
                return

    def _stall(self) -> None:
        # Hold the connection open without sending, until the client hangs up (or a minute).
        self.connection.settimeout(0.05)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.connection.recv(1, 2) == b"":  # MSG_PEEK: empty read = client left
                    return
            except TimeoutError:
                continue
            except OSError:
                return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    Handler.root = args.root
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"stand-in hub on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
