"""The Fleet proxy: only Flower's Fleet routes pass, bounded, relayed byte for byte; the rest 404.

Most tests drive the ASGI app in process against a stub SuperLink (httpx's ASGI
transport, no sockets); one runs the proxy as the process ``pollen server`` starts, with
TLS on 127.0.0.1, and stops it by PID.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pollen.certs import make_certificates
from pollen.flower_processes import ProcessTree, free_port, offline_env, wait_until_ready
from pollen.server.fleet_proxy import (FLEET_ROUTES, NOT_FORWARDED, FleetProxy, ProxySettings, RateLimiter,
                                       RequestLimits, end_to_end, parse_settings, printable)

REFUSED = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"), ("POST", "/v1/control/stop-run"),
           ("POST", "/v1/control/register-supernode"), ("POST", "/v1/runtime/pull-messages"),
           ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"), ("GET", "/"),
           ("GET", "/v1/fleet/get-run"), ("PUT", "/v1/fleet/push-object"), ("OPTIONS", "/v1/fleet/get-run"),
           ("POST", "/v1/fleet/get-run/"), ("POST", "/V1/fleet/get-run"), ("POST", "/v1/fleet"),
           ("POST", "/v1/fleet/get-run/../../control/list-runs"), ("POST", "/v1/fleet/get-run%2F..%2Fcontrol")]


class StubSuperLink:
    """Answers every request with what it received; remembers the paths it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.echo, methods=["GET", "POST", "PUT", "OPTIONS"])])

    async def echo(self, request: Request) -> Response:
        self.seen.append(request.url.path)
        body = await request.body()
        if request.url.path == "/v1/fleet/pull-object":
            return StreamingResponse(frames(body), media_type="application/vnd.flwr.protobuf-stream")
        if request.url.path == "/v1/fleet/activate-node":  # Flower's own refusal, relayed as it is
            return Response(b'{"detail":"Invalid SuperNode authentication"}', 401, media_type="application/json")
        return Response(json.dumps({"path": request.url.path, "query": request.url.query, "bytes": len(body),
                                    "headers": dict(request.headers)}).encode(),
                        media_type="application/x-protobuf", headers={"x-flwr-echo": "1"})


async def frames(body: bytes):
    for i in range(3):  # Flower's streams: a 4-byte length, then the payload
        await asyncio.sleep(0.01)
        yield len(body).to_bytes(4, "big") + body + bytes([i])


def proxy_client(stub: StubSuperLink, limits: RequestLimits | None = None, address: str = "10.0.0.7",
                 proxy: FleetProxy | None = None) -> httpx.AsyncClient:
    proxy = proxy or FleetProxy("http://superlink", limits or RequestLimits(max_request_bytes=1000))
    proxy.client = httpx.AsyncClient(transport=httpx.ASGITransport(stub.app), timeout=10)
    return httpx.AsyncClient(transport=httpx.ASGITransport(proxy, client=(address, 4321)), base_url="http://proxy")


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_allow_list_is_exactly_flowers_fleet_api_as_supernodes_call_it():
    import inspect

    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode import fleet_http_client

    served = {(method, route.path) for route in router.routes for method in route.methods}
    called = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(fleet_http_client)))
    assert served == {("POST", path) for path in FLEET_ROUTES}
    assert called == FLEET_ROUTES


def test_fleet_routes_pass_with_body_and_headers_and_everything_else_gets_an_empty_404():
    stub = StubSuperLink()

    async def exchange():
        async with proxy_client(stub) as client:
            passed = {path: await client.post(path + "?debug=1", content=b"\x08\x01payload",
                                              headers={"flwr-public-key": "a2V5", "flwr-signature": "c2ln",
                                                       "content-type": "application/x-protobuf",
                                                       "connection": "keep-alive"})
                      for path in sorted(FLEET_ROUTES - {"/v1/fleet/pull-object", "/v1/fleet/activate-node"})}
            refused = [await client.request(method, path, content=b"x") for method, path in REFUSED]
            streamed = await client.post("/v1/fleet/pull-object", content=b"abc")
            flower_refusal = await client.post("/v1/fleet/activate-node", content=b"")
            return passed, refused, streamed, flower_refusal

    passed, refused, streamed, flower_refusal = run(exchange())
    for path, reply in passed.items():
        echo = reply.json()
        assert reply.status_code == 200 and reply.headers["x-flwr-echo"] == "1"
        assert reply.headers["content-type"] == "application/x-protobuf"
        assert echo["path"] == path and echo["query"] == "" and echo["bytes"] == len(b"\x08\x01payload")
        assert echo["headers"]["flwr-public-key"] == "a2V5" and echo["headers"]["flwr-signature"] == "c2ln"
    for reply in refused:
        assert (reply.status_code, reply.content) == (404, b"")
        assert set(reply.headers) <= {"content-length", "date"}  # nothing names what runs here
    assert sorted(stub.seen) == sorted([*passed, "/v1/fleet/pull-object", "/v1/fleet/activate-node"])
    assert streamed.content == b"".join(len(b"abc").to_bytes(4, "big") + b"abc" + bytes([i]) for i in range(3))
    assert (flower_refusal.status_code, flower_refusal.json()) == (401, {"detail": "Invalid SuperNode authentication"})


def test_a_body_over_the_limit_gets_413_and_never_reaches_the_superlink():
    stub = StubSuperLink()

    async def chunked(size: int):
        for _ in range(size // 100):
            yield b"x" * 100

    async def exchange():
        async with proxy_client(stub, RequestLimits(max_request_bytes=1000)) as client:
            at_limit = await client.post("/v1/fleet/push-object", content=b"x" * 1000)
            declared = await client.post("/v1/fleet/push-object", content=b"x" * 1001)
            undeclared = await client.post("/v1/fleet/push-object", content=chunked(5000))  # no content-length
            after = await client.post("/v1/fleet/push-object", content=b"y")
            return at_limit, declared, undeclared, after

    at_limit, declared, undeclared, after = run(exchange())
    assert at_limit.status_code == 200 and at_limit.json()["bytes"] == 1000
    assert (declared.status_code, declared.content) == (413, b"")
    assert (undeclared.status_code, undeclared.content) == (413, b"")
    assert after.status_code == 200 and stub.seen == ["/v1/fleet/push-object"] * 2


def test_each_client_address_has_its_own_rate_and_a_refused_one_gets_429():
    stub = StubSuperLink()
    proxy = FleetProxy("http://superlink", RequestLimits(max_request_bytes=100, requests_per_second=0.001, burst=3))

    async def exchange():
        async with proxy_client(stub, proxy=proxy, address="10.0.0.1") as device, \
                proxy_client(stub, proxy=proxy, address="10.0.0.2") as other:
            first = [(await device.post("/v1/fleet/get-run", content=b"")).status_code for _ in range(3)]
            over = await device.post("/v1/fleet/get-run", content=b"")
            probe = await device.post("/v1/control/list-runs", content=b"")  # probing is rate limited too
            elsewhere = await other.post("/v1/fleet/get-run", content=b"")
            return first, over, probe, elsewhere

    first, over, probe, elsewhere = run(exchange())
    assert first == [200, 200, 200]
    assert (over.status_code, over.content, over.headers["retry-after"]) == (429, b"", "1")
    assert probe.status_code == 429 and elsewhere.status_code == 200
    assert len(stub.seen) == 4


def test_rate_limiter_refills_at_its_rate_and_forgets_the_least_recent_clients():
    limiter = RateLimiter(rate=2.0, burst=4, max_clients=2)
    assert [limiter.allow("a", now=0.0) for _ in range(5)] == [True] * 4 + [False]
    assert limiter.allow("a", now=0.4) is False  # 0.8 of a token back
    assert limiter.allow("a", now=0.5) is True and limiter.allow("a", now=0.5) is False
    assert limiter.allow("a", now=100.0) and limiter.buckets["a"][0] == 3.0  # refilled up to burst only
    limiter.allow("b", now=100.0)
    limiter.allow("c", now=100.0)
    assert list(limiter.buckets) == ["b", "c"]


def test_an_unreachable_superlink_gets_an_empty_502():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    proxy = FleetProxy("http://superlink", RequestLimits(max_request_bytes=100))

    async def exchange():
        proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(proxy), base_url="http://proxy") as client:
            return await client.post("/v1/fleet/get-run", content=b"")

    reply = run(exchange())
    assert (reply.status_code, reply.content) == (502, b"")


def test_end_to_end_drops_hop_by_hop_headers_and_joins_repeated_ones():
    headers = [("Host", "x"), ("Connection", "close"), ("Content-Length", "3"), ("Accept", "a"), ("accept", "b"),
               ("flwr-public-key", "k"), ("Transfer-Encoding", "chunked")]
    assert end_to_end(headers, NOT_FORWARDED) == {"accept": "a, b", "flwr-public-key": "k"}


def test_limits_and_settings_refuse_bad_values_naming_the_flag(tmp_path):
    for kwargs, flag in (({"max_request_bytes": 0}, "--max-request-bytes"),
                         ({"max_request_bytes": 1, "requests_per_second": 0}, "--rate-limit"),
                         ({"max_request_bytes": 1, "burst": 0}, "--rate-burst")):
        with pytest.raises(ValueError, match=flag):
            RequestLimits(**kwargs)
    settings = ProxySettings("0.0.0.0", 9093, "https://127.0.0.1:9092", RequestLimits(5000, 2.5, 30),
                             tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem")
    command = settings.command()
    assert command[1:3] == ["-m", "pollen.server.fleet_proxy"]
    assert parse_settings(command[3:]) == settings
    plain = ProxySettings("127.0.0.1", 1, "http://127.0.0.1:2", RequestLimits(10))
    assert parse_settings(plain.command()[3:]) == plain
    with pytest.raises(SystemExit):
        parse_settings([*plain.command()[3:], "--certfile", "only-a-cert.pem"])


def test_the_proxy_process_terminates_tls_forwards_fleet_calls_and_survives_refusals(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"], devices=1)
    stub, upstream_port, port = StubSuperLink(), free_port(), free_port()
    upstream = uvicorn.Server(uvicorn.Config(stub.app, host="127.0.0.1", port=upstream_port, log_level="warning",
                                             ssl_certfile=str(certs.server_cert), ssl_keyfile=str(certs.server_key)))
    thread = threading.Thread(target=upstream.run, daemon=True)
    thread.start()
    settings = ProxySettings("127.0.0.1", port, f"https://127.0.0.1:{upstream_port}", RequestLimits(2000, 50, 100),
                             certs.server_cert, certs.server_key, certs.ca_cert)
    proxy = ProcessTree.start(settings.command(), tmp_path / "proxy.log", offline_env())
    try:
        wait_until_ready("127.0.0.1", port, proxy, timeout=60)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=certs.ca_cert), timeout=30) as device:
            forwarded = device.post("/v1/fleet/push-messages", content=b"m" * 2000)
            refused = device.post("/v1/control/list-runs", content=b"")
            oversize = device.post("/v1/fleet/push-object", content=b"m" * 2001)
            streamed = device.post("/v1/fleet/pull-object", content=b"obj")
        with pytest.raises(httpx.TransportError):  # TLS only: plain HTTP gets no answer
            httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", timeout=5)
        assert forwarded.status_code == 200 and forwarded.json()["bytes"] == 2000
        assert (refused.status_code, refused.content) == (404, b"")
        assert (oversize.status_code, oversize.content) == (413, b"")
        assert streamed.content == b"".join(b"\x00\x00\x00\x03obj" + bytes([i]) for i in range(3))
        assert stub.seen == ["/v1/fleet/push-messages", "/v1/fleet/pull-object"]
        assert proxy.running()
        log = Path(proxy.log).read_text()
        assert "Fleet API only" in log and "404: POST /v1/control/list-runs from 127.0.0.1" in log
        assert "413: POST /v1/fleet/push-object" in log
    finally:
        proxy.stop()
        upstream.should_exit = True
        thread.join(timeout=30)
    assert not proxy.running() and not proxy.alive()


def test_a_refusal_is_logged_on_one_line_whatever_the_caller_wrote(caplog):
    async def exchange():
        async with proxy_client(StubSuperLink()) as client:  # an escape sequence would redraw a terminal
            return await client.post("/v1/control/x%1B[2J", content=b"")

    with caplog.at_level("WARNING", logger="pollen.fleet_proxy"):
        assert run(exchange()).status_code == 404
    [line] = [record.getMessage() for record in caplog.records]
    assert line == "404: POST /v1/control/x\\x1b[2J from 10.0.0.7 (not a Fleet route)"
    assert printable("line\nforged") == "line\\nforged" and printable("é" * 200) == "\\xe9" * 100
