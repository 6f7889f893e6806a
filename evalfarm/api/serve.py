"""Running the API under uvicorn, in one process or several behind one socket."""

from __future__ import annotations

import socket

APP = "evalfarm.api.app:create_app"


def serve(host: str, port: int, *, workers: int = 1, log_level: str = "info") -> None:
    import uvicorn

    if workers <= 1:
        uvicorn.run(APP, factory=True, host=host, port=port, log_level=log_level)
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(APP, factory=True, host=host, port=port, workers=workers, log_level=log_level)
    Multiprocess(config, sockets=[listening_socket(host, port)]).run()


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket the worker processes share, made as a TCP socket by name. uvicorn makes its own with
    protocol 0, and asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP: its processes then
    answered every keep-alive request ~40 ms late (Nagle waiting for a delayed ACK; measured in bench/api.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
