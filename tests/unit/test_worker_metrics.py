"""The supervisor's one Prometheus endpoint merges its workers' loopback scrapes: a worker that answers badly (dying
mid-reply, another process on its port) loses its own samples from that scrape, never every worker's."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from service.supervisor import _WorkerMetrics

GOOD = b"# HELP detseg_up up\n# TYPE detseg_up gauge\ndetseg_up 1.0\n"


def _serve(body: bytes, length: int) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers() -> Iterator[list[http.server.HTTPServer]]:
    started = [
        _serve(GOOD, len(GOOD)),
        _serve(GOOD[:20], len(GOOD)),  # cut short: http.client.IncompleteRead
        _serve(b"not {prometheus text", 21),  # another process's answer: the parser's ValueError
    ]
    yield started
    for s in started:
        s.shutdown()
        s.server_close()


def test_a_worker_answering_badly_loses_only_its_own_samples(servers) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]  # bound, never listening: connection refused (OSError)
    ports = [s.server_address[1] for s in servers] + [refused, 0]
    try:
        families = list(_WorkerMetrics(ports).collect())
    finally:
        closed.close()
    samples = [(s.name, s.labels, s.value) for f in families for s in f.samples]
    assert samples == [("detseg_up", {"worker": "0"}, 1.0)]
