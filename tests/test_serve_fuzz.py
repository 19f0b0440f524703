"""benchmarks/fuzz_serve.py against a live `recyclegpt serve` (tiny random checkpoint, fp32, eager): requests
generated from the server's own /openapi.json, valid and broken, get no 5xx, the engine never restarts, and a
greedy request afterwards still returns the offline `ar` text."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("hypothesis_jsonschema")
jsonschema = pytest.importorskip("jsonschema")
from conftest import load_benchmark  # noqa: E402
from test_serve import KEY, TEMPLATE, LiveServer, _opts, offline_ar  # noqa: E402

from recyclegpt.serve.app import ChatTemplate, create_app  # noqa: E402

LIMIT = 8  # the server's max_tokens limit: valid requests stay cheap


@pytest.fixture(scope="module")
def fz():
    return load_benchmark("fuzz_serve")


@pytest.fixture(scope="module")
def server(bundle):
    _, m = bundle
    app = create_app(m, _opts(max_tokens_limit=LIMIT), ChatTemplate(TEMPLATE, eos="<|endoftext|>"))
    with LiveServer(app) as s:
        yield s


def test_generated_requests_follow_the_schema_and_cover_every_kind(fz, server):
    import httpx

    schemas = fz.body_schemas(httpx.get(server.url + "/openapi.json").json())
    assert set(schemas) == {"/v1/completions", "/v1/chat/completions"}
    for schema in schemas.values():
        assert "$ref" not in json.dumps(schema)
        cases = fz.generate_cases(schema, "tiny", 200, seed=1, max_tokens=LIMIT)
        assert len(cases) == 200 and {c.kind for c in cases} == set(fz.KINDS)
        assert fz.generate_cases(schema, "tiny", 20, seed=1, max_tokens=LIMIT)[0].body  # a smaller run works too
        valid = jsonschema.Draft202012Validator(schema)
        for c in cases:
            if c.kind in ("valid", "valid-any"):
                assert valid.is_valid(json.loads(c.body)), c.body
            if c.kind == "valid":
                body = json.loads(c.body)
                assert body["model"] == "tiny" and (body.get("max_tokens") or 0) <= LIMIT
        assert sum(c.kind.startswith("valid") for c in cases) >= 80  # about half


def test_fuzz_finds_no_5xx_and_the_server_still_answers_like_offline_ar(fz, server, bundle):
    _, m = bundle
    rep = fz.fuzz(server.url, KEY, 150, seed=0, max_tokens=LIMIT, deadline_s=120)
    fails = [ex for r in rep["routes"].values() for ex in r["failing_examples"]]
    assert rep["5xx"] == 0 and rep["failures"] == 0, fails
    assert rep["skipped"] == 0
    for route in ("POST /v1/completions", "POST /v1/chat/completions"):
        r = rep["routes"][route]
        assert r["count"] == 150
        assert r["statuses"].get("200", 0) >= 5 and r["statuses"].get("400", 0) >= 10  # both served and refused
    for route in ("GET /v1/models", "GET /health", "GET /metrics"):
        assert rep["routes"][route]["count"] >= 3
    h = rep["health_after"]
    assert h["http_status"] == 200 and h["status"] == "ok" and h["restarts"] == 0
    assert rep["ok"]
    json.dumps(rep)  # JSON-able
    prompt = "def add(a, b):"
    assert fz.greedy_text(server.url, KEY, "tiny", prompt, LIMIT) == offline_ar(m, prompt, LIMIT)
