"""free_port for the benchmark scripts (kept apart from tests/ so benchmarks stand alone)."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
