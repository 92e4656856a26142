"""The bearer token and the body-size limit, checked in ASGI before FastAPI parses a body.

Both must hold before anything reads the body: a 4 MiB limit enforced after parsing would already have spent
the memory and CPU it protects, and an unauthenticated client should not get to send one. The settings belong
to the replica (``token``, ``max_body_bytes``), which the middleware looks up per request, since the FastAPI app
is one module-level object shared by every deployment in the process.

Every check fails closed. A replica decides at start whether it serves without a token (``replica_token``): only
when Serve binds a loopback address; otherwise a missing ``METALSTM_SERVE_TOKEN`` stops it from starting. A
request that reaches the app outside a replica, or a replica whose token state is unknown, gets 503, never an
open answer. ``metalstm serve`` and the application builders make the same check earlier (``require_token``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ray import serve

from pipeline.serving.schema import MAX_BODY_BYTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
OPEN_PATHS = ("/healthz",)  # what answers without the token (load balancers' health checks)
TOKEN_ENV = "METALSTM_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted with a warning (tests use short ones)
UNKNOWN = object()  # a token state the guard cannot vouch for: it refuses every request

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- when a token is required


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``0.0.0.0``, ``::`` and names do not)."""
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_env: str = TOKEN_ENV) -> str | None:
    """The bearer token from the environment (surrounding whitespace, as a Secret file may add, removed)."""
    return (os.environ.get(token_env) or "").strip() or None


def require_token(host: str | None, token: str | None, token_env: str, where: str) -> None:
    """Refuse (ValueError) to serve on ``host`` without a token unless it is a loopback address; an unknown host
    (None) counts as not loopback."""
    if token is None and (host is None or not is_loopback(host)):
        shown = "an address Serve did not report" if host is None else f"{host!r}, not a loopback address"
        raise ValueError(f"{where}: serving on {shown} needs a bearer token: set {token_env} to a long random "
                         f"string in the environment (from a Kubernetes Secret, or the shell that starts the Ray "
                         f"nodes; never in a runtime_env, which the dashboard shows). Refusing to serve an open API.")


def serve_http_host(timeout_s: float = 10.0) -> str | None:
    """The host Serve's HTTP proxies (and direct-ingress replicas) bind, asked of the running Serve controller;
    None when there is no controller to ask."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE  # what serve.status asks

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve is not started yet
        return None
    try:
        return ray.get(controller.get_http_config.remote(), timeout=timeout_s).host
    except Exception as e:  # an API that moved, a controller that does not answer: the caller decides
        log.warning("could not ask Serve which host it binds: %s: %s", type(e).__name__, e)
        return None


def replica_token(token_env: str, deployment: str) -> str | None:
    """A replica's token, decided once at start: without one it starts only when Serve binds a loopback
    address (an unknown address counts as not loopback)."""
    token = read_token(token_env)
    if token is None:
        require_token(serve_http_host(), None, token_env, deployment)
        log.warning("%s: no %s set: serving without a bearer token on a loopback address", deployment, token_env)
    elif len(token) < MIN_TOKEN_CHARS:
        log.warning("%s: %s is only %d characters; use a long random string", deployment, token_env, len(token))
    return token


# ----------------------------------------------------------------------------- the guard


def _replica() -> Any:
    """The running replica's deployment object, or None outside a replica."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - Serve raises a plain RuntimeError outside a replica
        return None


async def _reply(send: Send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _route(scope: Scope) -> str:
    """The path below the application's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _token_of(server: Any) -> Any:
    """The replica's token, None when it decided at start to serve without one, else UNKNOWN."""
    token = UNKNOWN if server is None else getattr(server, "token", UNKNOWN)
    return token if token is None or (isinstance(token, str) and token) else UNKNOWN


def _refusal(scope: Scope, token: str | None, limit: int) -> tuple[int, str, list] | None:
    """Why the headers alone refuse this request (status, detail, extra headers), or None."""
    headers = dict(scope.get("headers") or [])
    if token and _route(scope) not in OPEN_PATHS:
        given = headers.get(b"authorization", b"").decode("latin-1")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            return 401, "missing or wrong bearer token (Authorization: Bearer <token>)", [(b"www-authenticate",
                                                                                            b"Bearer")]
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            return 400, "Content-Length: not an integer", []
        if size > limit:
            return 413, f"request body: {size} bytes exceeds the limit of {limit} bytes", []
    return None


class GuardMiddleware:
    """Bearer token (when the replica has one; 503 when that is unknown) and body-size limit, both checked before
    the body is parsed."""

    def __init__(self, inner: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        server = _replica()
        token = _token_of(server)
        if token is UNKNOWN:  # outside a replica, or one whose start did not settle the token: never open
            log.error("refusing %s %s: no replica context or unknown token state", scope.get("method"),
                      scope.get("path"))
            return await _reply(send, 503, "the server cannot tell which bearer token to require; refusing "
                                           "(retry: a replica may still be starting)", [(b"retry-after", b"1")])
        limit = getattr(server, "max_body_bytes", MAX_BODY_BYTES)
        refused = _refusal(scope, token, limit)
        if refused:
            return await _reply(send, *refused)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.inner(scope, receive, send)
        body, more = bytearray(), True  # a chunked body has no length: count it as it comes
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _reply(send, 413, f"request body: more than the limit of {limit} bytes")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.inner(scope, replay, send)
