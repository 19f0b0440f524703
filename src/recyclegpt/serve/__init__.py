"""`recyclegpt serve`: an OpenAI-compatible HTTP server with continuous batching.

    recyclegpt serve CKPT [--port 8000] [--slots 8] [--api-key KEY]

- `app`: the FastAPI app (routes, validation, streaming, auth, limits);
- `protocol`: OpenAI's request/response shapes and its error format;
- `worker`: the engine thread (requests queue and take the decoding engine's free slots between rounds;
  a failure fails the requests it touched) and its supervisor (a failed engine is restarted);
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
    from ..runtime import in_thread, serial_here

    opts = ServeOptions(**options)
    # This (HTTP) thread stays serial and the compute runs on threads of its own: the engine thread, and a
    # short-lived one for loading and --tree auto (`runtime.serial_here` says why).
    opts.threads = serial_here()
    bundle = in_thread(RecycleGPT.from_pretrained, ckpt, device, dtype, threads=opts.threads)
    if opts.tree == "auto":
        in_thread(choose_server_draft, bundle, opts, threads=opts.threads)
    eos = bundle.tokenizer.tok.id_to_token(bundle.tokenizer.eos_id) if bundle.tokenizer.eos_id is not None else ""
    template = ChatTemplate.find(ckpt, eos=eos or "")
    if opts.model_name is None:
        opts.model_name = Path(ckpt).resolve().name
    app = create_app(bundle, opts, template)
    logging.getLogger(__name__).info("serving %s as '%s' on http://%s:%d (chat template: %s)", ckpt,
                                     opts.model_name, host, port, "yes" if template else "none")
    uvicorn.run(app, host=host, port=port, log_level="info")


def choose_server_draft(bundle, opts) -> None:
    """--tree auto: the chain or tree that decodes fastest with every slot busy (the shipped code and prose
    prompts, `slots` at a time, compiled as the server runs), measured here or read from the cache; it
    sets the rounds' width (the draft depth) and the tree size. Requests asking for a larger k are refused."""
    from ..prompts import load_prompts

    ps = load_prompts("all").prompts
    prompts = [ps[i % len(ps)] for i in range(opts.slots)]
    log = logging.getLogger(__name__)
    log.info("--tree auto: measuring chains and trees with %d busy slots (compile=%s)", opts.slots, opts.compile)
    choice = bundle.choose_draft(prompts, batch_size=opts.slots, compile=opts.compile)
    log.info("%s", choice.describe())
    best = choice.best
    opts.width, opts.tree, opts.tree_topk = best.k, best.tree, best.tree_topk
    opts.default_k = min(opts.default_k, best.k)
