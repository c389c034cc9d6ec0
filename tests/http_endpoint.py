"""A real HTTP server on loopback for the alert tests: webhook receiver and status page."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Endpoint:
    """A real HTTP server on loopback: records POSTs, answers GETs with `reply`.

    POSTs are answered 200, or with the statuses queued in `post_statuses` first (one
    each); `posts` records those answered 2xx, `rejected` the others."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict, str]] = []
        self.post_statuses: list[int] = []
        self.rejected: list[tuple[str, dict, int]] = []
        self.reply: tuple[int, object] = (200, {})
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = endpoint.post_statuses.pop(0) if endpoint.post_statuses else 200
                if 200 <= status < 300:
                    endpoint.posts.append(
                        (self.path, json.loads(body), self.headers["Content-Type"])
                    )
                else:
                    endpoint.rejected.append((self.path, json.loads(body), status))
                self.send_response(status)
                self.end_headers()

            def do_GET(self) -> None:
                status, payload = endpoint.reply
                body = (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                )
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def connect_status(state: str) -> tuple[int, dict]:
    """A Kafka Connect /connectors/<name>/status answer with one task."""
    return 200, {
        "name": "billing-cdc",
        "connector": {"state": state, "worker_id": "127.0.0.1:8083"},
        "tasks": [{"id": 0, "state": state, "worker_id": "127.0.0.1:8083"}],
    }
