"""A server inside this process, for tests, benchmarks and notebooks.

    with LiveServer(create_app(bundle, ServeOptions(...))) as s:
        httpx.post(s.url + "/v1/completions", json={...})

uvicorn runs the app in a thread on a free loopback port (127.0.0.1 only); leaving the block stops it, and
the decoding engine with it.
"""

from __future__ import annotations

import socket
import threading
import time


class LiveServer:
    """uvicorn serving `app` in a thread. ready: wait until /health answers 200 (else only for the socket)."""

    def __init__(self, app, ready: bool = True, timeout_s: float = 120.0, log_level: str = "warning"):
        import uvicorn

        self.app, self.ready, self.timeout_s = app, ready, timeout_s
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock, self.port = sock, sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started or (self.ready and httpx.get(self.url + "/health").status_code != 200):
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError(f"the server at {self.url} did not become {'ready' if self.ready else 'up'} "
                                   f"within {self.timeout_s:.0f} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
