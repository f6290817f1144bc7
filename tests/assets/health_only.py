"""A server that answers GET /health and refuses every completion (501): a stand-in for a llama.cpp
server that loaded a file it cannot generate with. Run: python health_only.py HOST PORT"""

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404, b'{"status": "ok"}')

    def do_POST(self) -> None:
        self._send(501, b'{"error": {"message": "This server does not support completions."}}')

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
