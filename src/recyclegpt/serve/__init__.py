"""`recyclegpt serve`: an OpenAI-compatible HTTP server with continuous batching.

    recyclegpt serve CKPT [--port 8000] [--slots 8] [--api-key KEY]

- `app`: the FastAPI app (routes, validation, streaming, auth, limits);
- `protocol`: OpenAI's request/response shapes and its error format;
- `worker`: the engine thread; requests queue and take the decoding engine's free slots between rounds;
- `metrics`: Prometheus metrics.

Needs the `serve` extra: `pip install -e ".[serve]"` (FastAPI, uvicorn, prometheus_client).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import RecycleError


def run_server(ckpt: str, host: str, port: int, device: str = "auto", dtype: str = "auto", **options) -> None:
    """Load a checkpoint and serve it until interrupted; `options` are `app.ServeOptions` fields."""
    try:
        import uvicorn

        from .app import ChatTemplate, ServeOptions, create_app
    except ImportError as e:
        raise RecycleError(f"recyclegpt serve needs the serve extra ({e.name} is missing): "
                           "pip install -e \".[serve]\"") from None
    from ..api import RecycleGPT

    opts = ServeOptions(**options)

    bundle = RecycleGPT.from_pretrained(ckpt, device=device, dtype=dtype)
    eos = bundle.tokenizer.tok.id_to_token(bundle.tokenizer.eos_id) if bundle.tokenizer.eos_id is not None else ""
    template = ChatTemplate.find(ckpt, eos=eos or "")
    if opts.model_name is None:
        opts.model_name = Path(ckpt).resolve().name
    app = create_app(bundle, opts, template)
    logging.getLogger(__name__).info("serving %s as '%s' on http://%s:%d (chat template: %s)", ckpt,
                                     opts.model_name, host, port, "yes" if template else "none")
    uvicorn.run(app, host=host, port=port, log_level="info")
