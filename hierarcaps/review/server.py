"""Serving the review page: a random token, a socket bound to 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from typing import TextIO

from hierarcaps.review.items import ImageIndex
from hierarcaps.review.store import ReviewStore

LOCALHOST = "127.0.0.1"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def review_url(sock: socket.socket, token: str) -> str:
    """The URL to open, token included."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def serve(store: ReviewStore, images: ImageIndex, host: str = LOCALHOST, port: int = 8765,
          out: TextIO = sys.stdout) -> None:
    """Print the review URL, then serve until interrupted (every answered action is already on disk)."""
    import uvicorn

    from hierarcaps.review.app import create_app

    token = secrets.token_urlsafe(24)
    sock = bind(host, port)
    progress = store.progress()
    print(f"reviewing {progress['total']} items ({progress['done']} done), verdicts in {store.path}", file=out)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        print(f"warning: listening on {host}: anyone who can reach this machine and has the URL can write verdicts", file=out)
    print(f"open {review_url(sock, token)}", file=out, flush=True)
    config = uvicorn.Config(create_app(store, images, token), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
