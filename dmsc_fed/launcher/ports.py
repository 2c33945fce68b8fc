"""Loopback ports: pick free ones, or check that a requested one is free."""

from __future__ import annotations

import socket

from dmsc_fed.errors import PortInUseError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_free(port: int, host: str = "127.0.0.1", what: str = "port") -> int:
    """Return ``port`` if it can be bound on ``host``, else raise PortInUseError."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise PortInUseError(f"{what} {host}:{port} is already in use ({err.strerror}); choose another") from None
    return port


def can_connect(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
