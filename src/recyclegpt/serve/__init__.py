"""`recyclegpt serve`: an OpenAI-compatible HTTP server with continuous batching.

    recyclegpt serve CKPT [--port 8000] [--slots 8] [--api-key KEY]

- `app`: the FastAPI app (routes, validation, streaming, auth, limits);
- `protocol`: OpenAI's request/response shapes and its error format;
- `client`: the API's side of the engine (requests out, detokenized text back; an engine that dies is seen
  and restarted), and where the engine runs: a process of its own (`process.py`) or a thread;
- `worker`: the engine's side (requests queue and take the decoding engine's free slots between rounds;
  a failure fails the requests it touched);
- `jobs`: one request on the API side; `options`: the settings both sides read;
- `metrics`: Prometheus metrics.

Needs the `serve` extra: `pip install -e ".[serve]"` (FastAPI, uvicorn, prometheus_client).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import RecycleError


def run_server(ckpt: str, host: str, port: int, engine: str = "process", **options) -> None:
    """Serve a checkpoint until interrupted; `options` are `options.ServeOptions` fields. engine 'process':
    decoding runs in a process of its own that loads the checkpoint (this one loads only its tokenizer);
    'thread': this process loads it and decodes on a thread (a crash there ends the server)."""
    try:
        import uvicorn

        from .app import ChatTemplate, create_app
    except ImportError as e:
        raise RecycleError(f"recyclegpt serve needs the serve extra ({e.name} is missing): "
                           "pip install -e \".[serve]\"") from None
    from ..runtime import in_thread, serial_here
    from .options import ServeOptions

    opts = ServeOptions(**options)
    # This (HTTP) thread stays serial and hands the compute to threads of its own (`runtime.serial_here` says
    # why): the engine process's, or in this process the engine thread and a short-lived one for loading.
    threads = serial_here()
    model = ckpt  # the engine process loads it; this one only its tokenizer (`create_app`)
    if engine == "thread":
        from ..api import RecycleGPT

        opts.threads = opts.threads or threads
        model = in_thread(RecycleGPT.from_pretrained, ckpt, opts.device, opts.dtype, threads=opts.threads)
    if opts.model_name is None:
        opts.model_name = Path(ckpt).resolve().name
    template = ChatTemplate.find(ckpt)
    app = create_app(model, opts, template)  # it gives the template the tokenizer's EOS
    app.state.engine.start()
    app.state.engine.wait_loaded()  # the engine could not load the model: a one-line error, nothing listening
    logging.getLogger(__name__).info("serving %s as '%s' on http://%s:%d (engine: %s; chat template: %s)", ckpt,
                                     opts.model_name, host, port, engine, "yes" if template else "none")
    uvicorn.run(app, host=host, port=port, log_level="info")
