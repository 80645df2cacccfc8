"""The server's layout, tested in-process (no socket): every route is assembled from the
routers, and the API routes share one shutdown check (a route dependency)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from chatforge import load_model
from chatforge.server import create_app
from chatforge.server.routes import ROUTERS
from chatforge.server.state import get_state, open_for_requests

API = [
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    ),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "tiny", "input": "hi"}),
    ("POST", "/tokenize", {"model": "tiny", "prompt": "hi"}),
    ("POST", "/detokenize", {"model": "tiny", "tokens": [1]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("GET", "/v1/adapters", None),
    ("POST", "/v1/adapters", {"name": "x", "path": "/nonexistent"}),
    ("DELETE", "/v1/adapters/x", None),
    ("GET", "/tokenizer_info", None),
]


@pytest.fixture(scope="module")
def client(tiny_llama_dir):
    app = create_app(load_model(str(tiny_llama_dir)), model_id="tiny")
    with TestClient(app) as c:
        yield c


def test_every_route_comes_from_a_router(client):
    served = set(client.app.openapi()["paths"])  # /metrics is left out of the schema
    from_routers = {r.path.replace(":path}", "}") for router in ROUTERS for r in router.routes}
    assert served == from_routers
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health"} <= served


def test_api_routers_refuse_work_while_draining_and_the_probes_still_answer(client):
    ok = client.post("/v1/chat/completions", json={**API[0][2], "max_tokens": 2})
    assert ok.status_code == 200
    state = get_state(client)
    state.draining = True
    try:
        for method, path, body in API:
            r = client.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert "shutting down" in r.json()["error"]["message"], path
        assert client.get("/health").json()["status"] == "draining"
        assert client.get("/").status_code == 200  # the page is static
    finally:
        state.draining = False
    assert client.get("/v1/models").status_code == 200


def test_the_api_routers_declare_the_shutdown_check(client):
    public = {"/health", "/", "/static/{name}"}  # the page and its files
    for router in ROUTERS:
        for route in router.routes:
            deps = [d.call for d in route.dependant.dependencies]
            if route.path in public:
                assert open_for_requests not in deps, route.path
            else:
                assert open_for_requests in deps, route.path
