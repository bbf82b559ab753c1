"""The devices' door: a reverse proxy that lets through Flower's Fleet API and nothing else.

Why it exists. Flower 1.42's ``flower-superlink`` serves every API on its one ``--host``
``--port``: the Fleet API (``/v1/fleet/*``, SuperNodes), the Control API
(``/v1/control/*``: ``flwr run``, ``ls``, ``stop``, ``supernode register``), the Runtime
API (``/v1/runtime/*``), ``/health`` and ``/docs``. ``--control-api-address`` is
deprecated and moves only the legacy gRPC Control API; node authentication guards the
Fleet routes only; the Control API's account authentication needs Flower's enterprise
plugin (the open-source build has a no-op one that admits everyone). So the SuperLink
listens on 127.0.0.1 and this proxy, on the public host and port, terminates TLS with
the server certificate and forwards only ``FLEET_ROUTES`` to it. Everything else gets an
empty 404: nothing tells a caller what exists behind it.

Why uvicorn + starlette + httpx. The SuperLink itself runs on uvicorn and Flower's
SuperNodes speak httpx, so these are already installed, maintained and exercised on
exactly this traffic; the proxy needs no system package, no root and no second
configuration language (an nginx would need both, and a config generator tested against
a binary that is not on the devices' machines), and it runs wherever Pollen runs. It is
one small ASGI app: route allow-list, request bounds, and a byte-for-byte relay.

Bounds. A request body over ``max_request_bytes`` gets 413 and never reaches the
SuperLink (bodies are read up to the limit before forwarding: Fleet requests are unary,
and Flower's own server reads them whole too). Each client address has a token bucket
of ``burst`` requests refilled at ``requests_per_second``; beyond it, 429. Responses are
relayed as they stream (protobuf, or Flower's length-framed protobuf streams).

Run it as its own process, so whoever starts it can stop it by PID:
``python -m pollen.server.fleet_proxy --port 9093 --upstream https://127.0.0.1:PORT ...``
(``ProxySettings.command()`` writes that line).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

# Every route flwr/supernode/fleet_http_client.py calls, all POST; Flower's Fleet router
# (flwr/superlink/routers/fleet/router.py) has exactly these (tests/test_fleet_proxy.py).
FLEET_ROUTES = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection, not to the message.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade"})
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length"}  # httpx sets both for the upstream request
NOT_RELAYED = HOP_BY_HOP | {"server", "date"}  # uvicorn writes its own date; server names the software
MAX_CONNECTIONS = 1024  # open at once; beyond, uvicorn answers 503, which SuperNodes retry
MAX_TRACKED_CLIENTS = 10_000  # token buckets kept; the least recently seen go first
log = logging.getLogger("pollen.fleet_proxy")


@dataclass(frozen=True)
class RequestLimits:
    """What one device may send: bytes per request and requests per second (per client address)."""

    max_request_bytes: int | None = None  # None: not sized yet (the deployment sizes it to the model)
    requests_per_second: float = 20.0
    burst: int = 400

    def __post_init__(self) -> None:
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes: must be at least 1, got {self.max_request_bytes}")
        if not self.requests_per_second > 0:
            raise ValueError(f"--rate-limit: must be above 0 requests per second, got {self.requests_per_second}")
        if self.burst < 1:
            raise ValueError(f"--rate-burst: must be at least 1 request, got {self.burst}")


class RateLimiter:
    """A token bucket per client: ``burst`` requests at once, refilled at ``rate`` a second."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, then = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > self.max_clients:
            # A forgotten client starts with a full bucket: forgetting is generous, never stricter.
            self.buckets.popitem(last=False)
        return allowed


class FleetProxy:
    """The ASGI app: allow-listed Fleet routes go to ``upstream``, within ``limits``; the rest 404."""

    def __init__(self, upstream: str, limits: RequestLimits, upstream_ca: Path | None = None) -> None:
        if limits.max_request_bytes is None:
            raise ValueError("--max-request-bytes: the proxy needs a number")
        self.upstream = upstream.rstrip("/")
        self.limits = limits
        self.rate = RateLimiter(limits.requests_per_second, limits.burst)
        self.limited: set[str] = set()  # clients now over their rate: logged once per episode
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(upstream_ca)) if upstream_ca else True
        # Every Fleet call is unary and a SuperNode gives up on it after 30 s; waiting longer
        # upstream only holds a connection for nobody. A full pool is a 502, which SuperNodes retry.
        self.client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0, connect=10.0, pool=30.0))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self.handle(Request(scope, receive))
            await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        # The rate comes first, so probing for routes is limited like everything else.
        if not self.rate.allow(client):
            if client not in self.limited:
                if len(self.limited) > MAX_TRACKED_CLIENTS:
                    self.limited.clear()
                self.limited.add(client)
                log.warning("429: %s is over %g requests/s (burst %d)", client,
                            self.limits.requests_per_second, self.limits.burst)
            return Response(status_code=429, headers={"retry-after": "1"})
        self.limited.discard(client)
        path = request.url.path
        if request.method != "POST" or path not in FLEET_ROUTES:
            log.warning("404: %s %s from %s (not a Fleet route)", printable(request.method), printable(path), client)
            return Response(status_code=404)
        body = await read_bounded(request, self.limits.max_request_bytes)
        if body is None:
            log.warning("413: %s %s from %s (over %d bytes)", request.method, path, client,
                        self.limits.max_request_bytes)
            return Response(status_code=413)
        return await self.forward(path, request, body)

    async def forward(self, path: str, request: Request, body: bytes) -> Response:
        # The allow-listed path, no query string: nothing the caller wrote beyond it goes upstream.
        upstream_request = self.client.build_request("POST", self.upstream + path, content=body,
                                                     headers=end_to_end(request.headers.items(), NOT_FORWARDED))
        try:
            reply = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as error:
            log.error("502: %s %s: the SuperLink did not answer (%s)", request.method, path, type(error).__name__)
            return Response(status_code=502)
        # aiter_raw: the bytes as the SuperLink sent them, content-encoding and framing untouched.
        return StreamingResponse(relay(reply), status_code=reply.status_code,
                                 headers=end_to_end(reply.headers.multi_items(), NOT_RELAYED))

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is over ``limit`` bytes (declared or as it arrives)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def relay(reply: httpx.Response):
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
    finally:
        await reply.aclose()


def printable(text: str, limit: int = 100) -> str:
    """A caller's text as one safe log line: cut short, control characters escaped."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def end_to_end(headers, dropped: frozenset[str]) -> dict[str, str]:
    """The headers that travel on: all but ``dropped`` (lower-case names; repeated names joined)."""
    kept: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if name not in dropped:
            kept[name] = f"{kept[name]}, {value}" if name in kept else value
    return kept


@dataclass(frozen=True)
class ProxySettings:
    """Where the proxy listens, where it forwards, with which certificate and limits."""

    host: str
    port: int
    upstream: str  # http(s)://127.0.0.1:PORT, the SuperLink
    limits: RequestLimits
    certfile: Path | None = None  # None: plain HTTP (`pollen server --insecure`)
    keyfile: Path | None = None
    upstream_ca: Path | None = None  # verifies the SuperLink's certificate

    def command(self) -> list[str]:
        """This proxy as a process: ``python -m pollen.server.fleet_proxy ...``."""
        command = [sys.executable, "-m", "pollen.server.fleet_proxy", "--host", self.host, "--port", str(self.port),
                   "--upstream", self.upstream, "--max-request-bytes", str(self.limits.max_request_bytes),
                   "--rate-limit", str(self.limits.requests_per_second), "--rate-burst", str(self.limits.burst)]
        for flag, path in (("--certfile", self.certfile), ("--keyfile", self.keyfile),
                           ("--upstream-ca", self.upstream_ca)):
            if path is not None:
                command += [flag, str(path)]
        return command


def parse_settings(argv: list[str] | None = None) -> ProxySettings:
    parser = argparse.ArgumentParser(prog="python -m pollen.server.fleet_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:9092")
    parser.add_argument("--max-request-bytes", type=int, required=True)
    parser.add_argument("--rate-limit", type=float, required=True, help="requests per second per client address")
    parser.add_argument("--rate-burst", type=int, required=True)
    parser.add_argument("--certfile", type=Path, help="TLS certificate (none: plain HTTP)")
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--upstream-ca", type=Path, help="CA that signed the SuperLink's certificate")
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    try:
        limits = RequestLimits(args.max_request_bytes, args.rate_limit, args.rate_burst)
    except ValueError as error:
        parser.error(str(error))
    return ProxySettings(args.host, args.port, args.upstream, limits, args.certfile, args.keyfile, args.upstream_ca)


def serve(settings: ProxySettings) -> None:
    """Listen until SIGTERM or Ctrl-C."""
    app = FleetProxy(settings.upstream, settings.limits, settings.upstream_ca)
    # h11 rather than httptools: it bounds a request's head (16 kB) before the app sees it.
    uvicorn.run(app, host=settings.host, port=settings.port, lifespan="on", ws="none", http="h11",
                ssl_certfile=settings.certfile, ssl_keyfile=settings.keyfile,
                # The TCP peer is the client: X-Forwarded-For from anyone must not pick the rate bucket.
                proxy_headers=False, server_header=False, access_log=False,
                limit_concurrency=MAX_CONNECTIONS, log_level="info")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request otherwise
    settings = parse_settings(argv)
    log.info("Fleet API only, on %s:%d (%s) -> %s; at most %d bytes a request, %g requests/s (burst %d) "
             "per client address", settings.host, settings.port, "TLS" if settings.certfile else "plain HTTP",
             settings.upstream, settings.limits.max_request_bytes, settings.limits.requests_per_second,
             settings.limits.burst)
    serve(settings)


if __name__ == "__main__":
    main()
