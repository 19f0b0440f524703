"""Fuzz the live HTTP API of `recyclegpt serve` from its own OpenAPI schema.

    python benchmarks/fuzz_serve.py [CKPT] [--examples 500] [--seed 0] [--json OUT]

Loads the checkpoint (default: the shipped one), starts the server in this process on a free loopback port
(eager decoding, 4 slots, max_tokens at most 8, a small chat template), and sends every route generated requests:
each POST route with a JSON body (from GET /openapi.json) gets EXAMPLES requests, about half of them valid bodies
drawn from the route's schema with hypothesis-jsonschema (most with the served model's name and a small max_tokens,
so that they decode), the rest invalid: one field replaced by an odd JSON value (integers past 2^64, 1e308,
5e-324, -0.0, NaN / Infinity literals, arrays, objects, ...), an unknown key, a missing required key, a JSON value
that is not an object, lone surrogates as JSON escapes or as surrogate-encoded bytes, bytes that are not UTF-8 (or
a body in UTF-16 / UTF-32), truncated JSON, nesting up to 50k levels deep, integers of 4300+ digits. GET /v1/models,
/health and /metrics get a few plain requests. The invariant: no answer has a status >= 500, none fails to come
(connection error, timeout), every 200 ends with a finish_reason (streams: no error event, then [DONE]), the engine
never restarts (GET /health is 200 with "restarts": 0 at the end), and afterwards a greedy request (temperature 0,
mode ar) still returns exactly the text that offline decoding gives.

Prints a table (route, requests, statuses, 5xx), writes the JSON report with --json and exits 0 when the invariant
held, 1 otherwise. `fuzz(url, api_key, examples_per_route)` runs the same against any running server.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "recyclegpt" / "assets" / "shipped"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
GET_ROUTES = ("/v1/models", "/health", "/metrics")
GREEDY_PROMPT = "def add(a, b):"
EXAMPLES_KEPT = 5  # failing examples kept per route

# What a request is, by share of a POST route's requests (about half valid).
KINDS: dict[str, float] = {
    "valid": 0.32,  # from the schema, with the served model and a small max_tokens: these decode
    "valid-any": 0.18,  # from the schema as it is (any model name: mostly 404)
    "replace-field": 0.15,
    "unknown-key": 0.05,
    "missing-required": 0.04,
    "non-object": 0.04,
    "surrogate": 0.08,
    "raw-bytes": 0.05,
    "truncated": 0.04,
    "deep-nesting": 0.03,
    "huge-int": 0.02,
}


# ------------------------------------------------------------------ JSON text beyond json.dumps
class Raw:
    """JSON text placed as is where this object stands in a value (`dumps`): numbers of any length, nesting
    json.dumps would recurse too deeply for, literals."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''}, {len(self.text)} chars)"


def dumps(value: Any, ascii_only: bool = True) -> str:
    """JSON text of `value`, with NaN / Infinity as JS literals, lone surrogates as \\uXXXX escapes (ascii_only)
    or as themselves, and `Raw` pieces spliced in."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), ensure_ascii=ascii_only, allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00", ensure_ascii=ascii_only), raw, 1)
    return text


def encode(value: Any, ascii_only: bool = True) -> bytes:
    """UTF-8 bytes of `dumps` (lone surrogates, if written as themselves, as their 3-byte 'surrogatepass' form)."""
    return dumps(value, ascii_only).encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------ the schema
def inline_refs(schema: Any, components: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`schema` with every {"$ref": "#/components/schemas/X"} replaced by X (inlined; the models have no
    recursion, which this refuses)."""
    if isinstance(schema, list):
        return [inline_refs(s, components, seen) for s in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str):
        prefix = "#/components/schemas/"
        if not ref.startswith(prefix):
            raise ValueError(f"unsupported $ref {ref}")
        name = ref[len(prefix):]
        if name in seen:
            raise ValueError(f"recursive schema {name}")
        target = inline_refs(components[name], components, (*seen, name))
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return {**target, **inline_refs(rest, components, seen)} if rest else target
    return {k: inline_refs(v, components, seen) for k, v in schema.items()}


def body_schemas(openapi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{path: inlined JSON schema} of each POST route with a JSON request body."""
    components = openapi.get("components", {}).get("schemas", {})
    out = {}
    for path, ops in openapi.get("paths", {}).items():
        body = (ops.get("post") or {}).get("requestBody") or {}
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            out[path] = inline_refs(schema, components)
    return out


# What the server takes beyond what its schema can say (a list of one prompt, no logit_bias, k up to its --max-k,
# 3 by default): the `served` bodies keep to these so that they decode.
SERVED = {
    "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]},
    "logit_bias": {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]},
    "k": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3}, {"type": "null"}]},
    "stop": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
}


def served_schema(schema: dict[str, Any], model: str | None, max_tokens: int) -> dict[str, Any]:
    """`schema` narrowed so that its bodies are served: `model` the served one, max_tokens at most `max_tokens`
    (and given, unless max_completion_tokens may be: a completion's default, 16, may be over the server's limit),
    the fields of SERVED as they say."""
    s = copy.deepcopy(schema)
    props = s.get("properties", {})
    if model is not None and "model" in props:
        props["model"] = {"const": model}
    count = {"type": "integer", "minimum": 0, "maximum": max_tokens}
    for name in ("max_tokens", "max_completion_tokens"):
        if name in props:
            props[name] = {"anyOf": [count, {"type": "null"}]}
    if "max_tokens" in props and "max_completion_tokens" not in props:
        props["max_tokens"] = count
        s["required"] = [*s.get("required", []), "max_tokens"]
    props.update({k: v for k, v in SERVED.items() if k in props})
    return s


# ------------------------------------------------------------------ strategies
def body_strategy(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under `schema` (inlined, no $ref): hypothesis-jsonschema's `from_schema` for every scalar
    schema, objects, arrays and anyOf composed here from the strategies of their parts. (from_schema's own object
    strategy drives a hypothesis internal, `many`, whose API hypothesis 6.1xx changed: with hypothesis 6.170 and
    hypothesis-jsonschema 0.23.1, the newest, it fails with "AttributeError: 'many' object has no attribute 'more'".)
    """
    meta = ("default", "title", "description", "examples")
    if "anyOf" in schema or "oneOf" in schema:
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf", *meta)}
        return st.one_of([body_strategy({**rest, **part}) for part in schema.get("anyOf") or schema["oneOf"]])
    if schema.get("type") == "object" or "properties" in schema:
        props, required = schema.get("properties", {}), set(schema.get("required", []))
        extra = schema.get("additionalProperties", True)
        if not props and isinstance(extra, dict):  # a map: {"1": 0.5}
            return st.dictionaries(st.text(max_size=8), body_strategy(extra), max_size=3)
        return st.fixed_dictionaries({k: body_strategy(v) for k, v in props.items() if k in required},
                                     optional={k: body_strategy(v) for k, v in props.items() if k not in required})
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        lo = schema.get("minItems", 0)
        return st.lists(body_strategy(schema["items"]), min_size=lo, max_size=schema.get("maxItems", lo + 4))
    return from_schema({k: v for k, v in schema.items() if k not in meta})


NAN, INF = float("nan"), float("inf")
ODD_VALUES: list[Any] = [
    2**64, 2**64 + 1, -(2**64), 2**63, -(2**63) - 1, 10**30, -(10**40),
    1e308, -1e308, 1.7976931348623157e308, 5e-324, -5e-324, -0.0, 0.0, 3.4028235677973366e38, 1e-45,
    NAN, INF, -INF, Raw("1e400"), Raw("-1e400"), Raw("1E+2"), Raw("-0"), Raw("0." + "0" * 400 + "1"),
    Raw("1" + "0" * 5000 + ".5"), Raw("9" * 4300), Raw("-" + "9" * 4299),
    True, False, None, "", "0", "1", "NaN", "null", "verify", [], {}, [[]], [None], {"": {}}, [1, [2, [3]]],
    "\u0000", "\ufeff", "\U0001f600", "a" * 10_000,
]


def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
              | st.text(max_size=20))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4),
                        max_leaves=max_leaves)


def odd_values() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(ODD_VALUES), st.integers(min_value=-(2**80), max_value=2**80), json_values())


def lone_surrogates() -> st.SearchStrategy[str]:
    one = st.integers(0xD800, 0xDFFF).map(chr)
    return st.one_of(one, st.just("\ude00\ud83d"), st.just("\udcff"), st.just("\ud800"),
                     st.lists(one, min_size=2, max_size=3).map("".join))


BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xed\xbf\xbf",
            b"\xed\xa0\xbd\xed\xb8\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe0\x80\xaf", b"\x00"]
MARK = "\u2603MARK\u2603"


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON value (as a key path), outermost first; the root is ()."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _set(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    _get(value, path[:-1])[path[-1]] = new
    return value


@dataclass
class Case:
    """One generated request: its kind, body bytes and whether it carries the right API key."""

    kind: str
    body: bytes
    auth: bool = True


def case_for(kind: str, data: st.DataObject, any_body: st.SearchStrategy, served_body: st.SearchStrategy,
             schema: dict[str, Any]) -> Case:
    """A request of `kind`, drawn with `data`."""
    draw = data.draw
    if kind == "valid-any":
        return Case(kind, encode(draw(any_body), draw(st.booleans())))
    body = draw(served_body)
    props = list(schema.get("properties", {}))
    if kind == "valid":
        return Case(kind, encode(body, draw(st.booleans())))
    if kind == "replace-field":
        paths = [p for p in _paths(body) if p] + [(k,) for k in props if k not in body]
        path = draw(st.sampled_from(paths))
        if len(path) == 1 and path[0] not in body:
            body[path[0]] = None
        return Case(kind, encode(_set(body, path, draw(odd_values())), draw(st.booleans())))
    if kind == "unknown-key":
        key = draw(st.one_of(st.text(max_size=12), st.sampled_from(["__proto__", "", "MODEL", "prompt ", "Model",
                                                                    "max-tokens", "n\u0000"])))
        where = [p for p in _paths(body) if isinstance(_get(body, p), dict)]
        target = _get(body, draw(st.sampled_from(where)))
        if key in target:
            key += "_x"
        target[key] = draw(json_values(4))
        return Case(kind, encode(body, draw(st.booleans())))
    if kind == "missing-required":
        where = [p for p in _paths(body) if isinstance(_get(body, p), dict)]
        # the body's own required keys most of the time, a nested object's (a chat message's) sometimes
        candidates = [(p, k) for p in where for k in _get(body, p)]
        top = [((), k) for k in schema.get("required", []) if k in body]
        path, key = draw(st.sampled_from(top)) if top and draw(st.integers(0, 3)) else draw(st.sampled_from(
            candidates or top))
        del _get(body, path)[key]
        return Case(kind, encode(body))
    if kind == "non-object":
        value = draw(st.one_of(json_values().filter(lambda v: not isinstance(v, dict)), st.sampled_from(ODD_VALUES),
                               st.lists(st.just(body), min_size=1, max_size=2)))
        return Case(kind, encode(value, draw(st.booleans())))
    if kind == "surrogate":
        # a lone surrogate in a string value or in a key, written as a JSON escape or as surrogate-encoded bytes
        spots = [("value", p) for p in _paths(body) if isinstance(_get(body, p), str)]
        spots += [("key", p) for p in _paths(body) if isinstance(_get(body, p), dict) and _get(body, p)]
        what, path = draw(st.sampled_from(spots))
        bad = draw(lone_surrogates())
        if what == "value":
            text = _get(body, path)
            at = draw(st.integers(0, len(text)))
            _set(body, path, text[:at] + bad + text[at:])
        else:
            obj = _get(body, path)
            key = draw(st.sampled_from(sorted(obj)))
            at = draw(st.integers(0, len(key)))
            obj[key[:at] + bad + key[at:]] = obj.pop(key)
        return Case(kind, encode(body, ascii_only=draw(st.booleans())))
    if kind == "raw-bytes":
        how = draw(st.sampled_from(["in-string", "in-string", "in-string", "utf-16", "utf-16-le", "utf-16-be",
                                    "utf-32", "utf-8-sig", "random", "oversized"]))
        if how == "in-string":
            path = draw(st.sampled_from([p for p in _paths(body) if isinstance(_get(body, p), str)]))
            _set(body, path, _get(body, path) + MARK)
            bad = draw(st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=6)))
            return Case(kind, encode(body, ascii_only=False).replace(MARK.encode(), bad, 1))
        if how == "random":
            return Case(kind, draw(st.binary(max_size=64)))
        if how == "oversized":  # over the server's default 1 MiB body limit: 413
            body[draw(st.sampled_from(sorted(body)))] = "x" * (1 << 21)
            return Case(kind, encode(body))
        return Case(kind, dumps(body, ascii_only=False).encode(how))
    if kind == "truncated":
        raw = encode(body, draw(st.booleans()))
        return Case(kind, raw[:draw(st.integers(0, len(raw) - 1))])
    if kind == "deep-nesting":
        depth = draw(st.sampled_from([100, 500, 900, 990, 1000, 1500, 5000, 50_000]))
        shape = draw(st.sampled_from(["array", "object", "mixed"]))
        leaf = draw(st.sampled_from(["1", "null", '"a"', "[]", "{}"]))
        if shape == "array":
            text = "[" * depth + leaf + "]" * depth
        elif shape == "object":
            text = '{"a":' * depth + leaf + "}" * depth
        else:
            text = '[{"a":' * (depth // 2) + leaf + "}]" * (depth // 2)
        if draw(st.booleans()):
            return Case(kind, text.encode())
        paths = [p for p in _paths(body) if p] + [(k,) for k in props if k not in body]
        path = draw(st.sampled_from(paths))
        if len(path) == 1 and path[0] not in body:
            body[path[0]] = None
        return Case(kind, encode(_set(body, path, Raw(text))))
    if kind == "huge-int":
        digits = draw(st.sampled_from([4299, 4300, 4301, 5000, 20_000]))
        text = draw(st.sampled_from(["", "-"])) + "1" + "0" * (digits - 1)
        if draw(st.integers(0, 3)) == 0:
            return Case(kind, text.encode())
        key = draw(st.sampled_from(props or ["x"]))
        body[key] = Raw(text)
        return Case(kind, encode(body))
    raise ValueError(f"unknown kind {kind}")


def _collector(kind: str, into: list[Case], any_body: st.SearchStrategy, served_body: st.SearchStrategy,
               schema: dict[str, Any]) -> Callable[[st.DataObject], None]:
    def collect(data: st.DataObject) -> None:
        into.append(case_for(kind, data, any_body, served_body, schema))

    return collect


def generate_cases(schema: dict[str, Any], model: str | None, n: int, seed: int = 0,
                   max_tokens: int = 8) -> list[Case]:
    """`n` requests for a route whose body has `schema`, in the shares of KINDS, in a seeded random order; each
    kind's requests drawn by one hypothesis run (seeded, no example database, generation only)."""
    rng = random.Random(seed)
    counts = Counter(rng.choices(list(KINDS), weights=list(KINDS.values()), k=n))
    any_body = body_strategy(schema)
    served_body = body_strategy(served_schema(schema, model, max_tokens))
    cases: list[Case] = []
    for i, kind in enumerate(KINDS):
        got: list[Case] = []
        for attempt in range(20):  # hypothesis may stop a run short (it ran out of distinct examples)
            if len(got) >= counts[kind]:
                break
            run = given(st.data())(_collector(kind, got, any_body, served_body, schema))
            run = settings(max_examples=counts[kind] - len(got), database=None, deadline=None, derandomize=False,
                           suppress_health_check=list(HealthCheck), phases=[Phase.generate])(run)
            hypothesis_seed(seed * 1_000_003 + i * 1009 + attempt)(run)()
        cases += got[:counts[kind]]
    for c in cases:  # a few valid ones with a wrong API key: 401
        c.auth = c.kind != "valid" or rng.random() >= 0.04
    rng.shuffle(cases)
    return cases


# ------------------------------------------------------------------ sending
@dataclass
class Outcome:
    status: str  # "200", "400", ..., "timeout", "error:ConnectError", "200-bad" (a 200 without a proper ending)
    text: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return not self.status.isdigit() or int(self.status) >= 500


def _check_200(body: bytes, streamed: bool) -> str | None:
    """Why a 200 answer is not a finished completion, or None."""
    text = body.decode("utf-8", "replace")
    if not streamed:
        try:
            data = json.loads(text)
            finish = data["choices"][0]["finish_reason"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "not a completion"
        return None if finish in ("stop", "length") else f"finish_reason {finish!r}"
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "the stream does not end with [DONE]"
    finish = None
    for ev in events[:-1]:
        try:
            data = json.loads(ev)
        except ValueError:
            return "an event is not JSON"
        if "error" in data:
            return f"an error event: {data['error']}"
        for c in data.get("choices", []):
            finish = c.get("finish_reason") or finish
    return None if finish in ("stop", "length") else "no finish_reason"


def _streamed(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("stream") is True


def send(client: httpx.Client, url: str, method: str, route: str, api_key: str | None, case: Case,
         timeout: float) -> Outcome:
    """One request; its status, or what went wrong when no answer came."""
    headers = {"Content-Type": "application/json"} if method == "POST" else {}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key if case.auth else 'wrong-key'}"
    t0 = time.monotonic()
    try:
        r = client.request(method, url + route, content=case.body if method == "POST" else None, headers=headers,
                           timeout=timeout)
    except httpx.TimeoutException as e:
        return Outcome("timeout", f"{type(e).__name__}: {e}", time.monotonic() - t0)
    except httpx.HTTPError as e:
        return Outcome(f"error:{type(e).__name__}", str(e), time.monotonic() - t0)
    out = Outcome(str(r.status_code), r.text[:500], time.monotonic() - t0)
    if r.status_code == 200 and method == "POST":
        why = _check_200(r.content, _streamed(case.body))
        if why is not None:
            out.status, out.text = "200-bad", f"{why}: {r.text[:400]}"
    return out


def _shown(body: bytes, limit: int = 300) -> str:
    text = repr(body)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(body)} bytes)"


@dataclass
class RouteReport:
    count: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    n5xx: int = 0
    failures: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, case: Case, out: Outcome) -> None:
        self.count += 1
        self.statuses[out.status] += 1
        self.by_kind.setdefault(kind, Counter())[out.status] += 1
        if out.status.isdigit() and int(out.status) >= 500:
            self.n5xx += 1
        if out.failed:
            self.failures += 1
            if len(self.examples) < EXAMPLES_KEPT:
                self.examples.append({"kind": kind, "status": out.status, "auth": case.auth,
                                      "seconds": round(out.seconds, 3), "body": _shown(case.body),
                                      "body_repr": _shown(case.body, 20_000), "response": out.text[:500]})

    def json(self) -> dict[str, Any]:
        return {"count": self.count, "statuses": dict(sorted(self.statuses.items())),
                "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(self.by_kind.items())},
                "5xx": self.n5xx, "failures": self.failures, "failing_examples": self.examples}


def fuzz(url: str, api_key: str | None, examples_per_route: int, seed: int = 0, deadline_s: float | None = None,
         progress: Callable[[int, int], None] | None = None, concurrency: int = 4, max_tokens: int = 8,
         timeout_s: float = 30.0) -> dict[str, Any]:
    """Send a running server `examples_per_route` generated requests on each POST route of its /openapi.json
    (and fewer plain ones on the GET routes), `concurrency` at a time, each with a `timeout_s` limit; stop
    sending after `deadline_s`. `max_tokens`: the token count valid bodies ask at most (the server's limit, so
    that they decode). Returns the report: per route the requests, their statuses (overall and per kind), the
    5xx answers, failures (5xx, no answer, a 200 that does not finish) with up to 5 examples; /health after."""
    url = url.rstrip("/")
    t0 = time.monotonic()
    auth = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    openapi = httpx.get(url + "/openapi.json", timeout=timeout_s).json()
    schemas = body_schemas(openapi)
    try:
        listed = httpx.get(url + "/v1/models", headers=auth, timeout=timeout_s).json()
        model = listed["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        model = None
    jobs: list[tuple[str, str, str, Case]] = []  # (method, route, kind, case)
    for i, (route, schema) in enumerate(sorted(schemas.items())):
        for case in generate_cases(schema, model, examples_per_route, seed + 7919 * i, max_tokens):
            jobs.append(("POST", route, case.kind, case))
    n_get = max(3, examples_per_route // 20)
    rng = random.Random(seed)
    for route in GET_ROUTES:
        if route in openapi.get("paths", {}):
            jobs += [("GET", route, "get", Case("get", b"", auth=rng.random() > 0.2)) for _ in range(n_get)]
    rng.shuffle(jobs)  # the routes' requests interleaved: chat and completions share the engine's rounds
    reports: dict[str, RouteReport] = {}
    done, lock, local = 0, threading.Lock(), threading.local()
    skipped = 0

    def one(job: tuple[str, str, str, Case]) -> None:
        nonlocal done, skipped
        method, route, kind, case = job
        if deadline_s is not None and time.monotonic() - t0 > deadline_s:
            with lock:
                skipped += 1
            return
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        out = send(local.client, url, method, route, api_key, case, timeout_s)
        with lock:
            reports.setdefault(f"{method} {route}", RouteReport()).add(kind, case, out)
            done += 1
            if progress is not None:
                progress(done, len(jobs))

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, jobs))
    try:
        h = httpx.get(url + "/health", timeout=timeout_s)
        health: dict[str, Any] = {"http_status": h.status_code, **h.json()}
    except (httpx.HTTPError, ValueError) as e:
        health = {"http_status": None, "error": f"{type(e).__name__}: {e}"}
    routes = {k: reports[k].json() for k in sorted(reports)}
    n5xx = sum(r["5xx"] for r in routes.values())
    failures = sum(r["failures"] for r in routes.values())
    healthy = health.get("http_status") == 200 and health.get("restarts") == 0
    return {"url": url, "model": model, "seed": seed, "examples_per_route": examples_per_route,
            "concurrency": concurrency, "max_tokens": max_tokens, "routes": routes, "requests": done,
            "skipped": skipped, "5xx": n5xx, "failures": failures, "health_after": health,
            "ok": failures == 0 and healthy and skipped == 0, "seconds": round(time.monotonic() - t0, 2)}


def greedy_text(url: str, api_key: str | None, model: str, prompt: str = GREEDY_PROMPT, max_tokens: int = 8,
                timeout_s: float = 60.0) -> str:
    """The server's greedy `ar` completion of `prompt`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    r = httpx.post(url.rstrip("/") + "/v1/completions", headers=headers, timeout=timeout_s,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "mode": "ar"})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def table(report: dict[str, Any]) -> str:
    rows = [("route", "requests", "statuses", "5xx")]
    for route, r in report["routes"].items():
        statuses = " ".join(f"{s}:{c}" for s, c in r["statuses"].items())
        rows.append((route, str(r["count"]), statuses, str(r["5xx"])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


# ------------------------------------------------------------------ the CLI: an in-process server
def main(argv: list[str] | None = None) -> int:
    from recyclegpt.bench.report import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="?", default=str(SHIPPED), help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--examples", type=int, default=500, help="requests per POST route (default 500)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated requests (default 0)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    ap.add_argument("--deadline", type=float, default=None, help="stop sending after this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    a = ap.parse_args(argv)

    from recyclegpt import RecycleGPT
    from recyclegpt.decoding import GenerationConfig, generate
    from recyclegpt.serve.app import ChatTemplate, create_app
    from recyclegpt.serve.options import ServeOptions
    from recyclegpt.serve.testing import LiveServer

    m = RecycleGPT.from_pretrained(a.ckpt, device="cpu", dtype="float32")
    limit = 8
    opts = ServeOptions(model_name="fuzz", slots=4, compile=False, max_tokens_limit=limit)
    eos = m.tokenizer.tok.id_to_token(m.tokenizer.eos_id) if m.tokenizer.eos_id is not None else ""
    app = create_app(m, opts, ChatTemplate(TEMPLATE, eos=eos or ""))
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            print(f"  {done}/{total} requests", file=sys.stderr, flush=True)

    with LiveServer(app, log_level="critical") as s:
        print(f"fuzzing {s.url} ({a.examples} requests per POST route, seed {a.seed})", file=sys.stderr)
        report = fuzz(s.url, opts.api_key, a.examples, seed=a.seed, deadline_s=a.deadline, progress=progress,
                      concurrency=a.concurrency, max_tokens=limit)
        served = greedy_text(s.url, opts.api_key, opts.model_name, GREEDY_PROMPT, limit)
    res = generate(m.model, None, [m.tokenizer.encode(GREEDY_PROMPT)],
                   GenerationConfig(mode="ar", max_new_tokens=limit, eos_id=m.tokenizer.eos_id))
    offline = m.tokenizer.decode(res.tokens[0])
    report["checkpoint"] = str(a.ckpt)
    report["greedy_after"] = {"prompt": GREEDY_PROMPT, "max_tokens": limit, "served": served, "offline": offline,
                              "match": served == offline}
    report["ok"] = report["ok"] and served == offline
    print(table(report))
    for route, r in report["routes"].items():
        for ex in r["failing_examples"]:
            print(f"FAIL {route} [{ex['kind']}] {ex['status']} after {ex['seconds']} s: {ex['body']} -> "
                  f"{ex['response']}")
    h = report["health_after"]
    print(f"health after: {h.get('http_status')} {h.get('status')} restarts={h.get('restarts')}; "
          f"greedy text {'matches' if served == offline else 'DIFFERS from'} offline ar "
          f"({served!r}{'' if served == offline else f' vs {offline!r}'}); {report['seconds']} s")
    if a.json is not None:
        write_json(report, a.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
