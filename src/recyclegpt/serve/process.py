"""The engine process of `recyclegpt serve`, started by `client.ProcessEngine` (not by users):

    python -m recyclegpt.serve.process FD

FD: its end of a socket pair to the API process, whose first message says what to serve ({"ckpt": ...,
"opts": ServeOptions fields}). It loads the checkpoint, runs `worker.Worker` on that connection, and ends
when the API says stop or goes away. Its thread layout comes from its environment
(`client.engine_environment`): the OpenMP threads, bound to their CPUs; this process's main thread is the
only one that runs torch ops, so it is the only OpenMP team.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
from multiprocessing.connection import Connection

PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    # Ctrl-C in a terminal reaches the whole process group: the API process shuts down and tells this one to
    # stop; taking it here too would end the engine mid-shutdown, and the API would see a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine %(name)s: %(message)s")
    from ..api import RecycleGPT
    from .options import ServeOptions
    from .worker import run_engine

    spec = conn.recv()
    opts = ServeOptions(**spec["opts"])
    try:
        run_engine(lambda: RecycleGPT.from_pretrained(spec["ckpt"], opts.device, opts.dtype), opts, conn)
    except BaseException:  # noqa: B036 -- `run_engine` logged it and told the API
        return 1
    return 0


def _end_with_parent() -> None:
    """Linux: this process gets SIGTERM when the API process dies, even by SIGKILL (elsewhere it ends when
    it next reads its closed connection). The signal comes when the *thread* that started this process ends,
    so the API keeps that thread until this process has ended (`client.EngineClient._run`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
