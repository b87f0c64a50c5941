"""The checks every request passes before it reaches the API or the UI (one pure ASGI middleware).

1. **Host** (servers bound to loopback): the ``Host`` header must name this machine, so a web page cannot reach the
   server through a DNS name rebound to 127.0.0.1.
2. **Origin**: a request that changes something (anything but GET/HEAD/OPTIONS, and websockets) from a browser must
   come from the server's own origin, so another site cannot submit jobs from a visitor's browser.
3. **Token** (when set): ``Authorization: Bearer TOKEN``, or the ``idfusion_token`` cookie the UI sets after one visit
   to ``/?token=TOKEN`` (the URL ``idfusion serve`` prints). Compared in constant time.
4. **Body size**: bodies beyond the limit are refused with 413, from ``Content-Length`` up front or while streaming.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .config import is_loopback

__all__ = ["TOKEN_COOKIE", "TOKEN_PATTERN", "RequestGuard", "check_token_text"]

TOKEN_COOKIE = "idfusion_token"
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{8,256}")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def check_token_text(token: str) -> str:
    """``token`` if it can travel in a header, a cookie and a URL unchanged (8-256 URL-safe characters)."""
    if not TOKEN_PATTERN.fullmatch(token):
        raise ValueError("the access token must be 8 to 256 characters from A-Z a-z 0-9 . _ ~ -")
    return token


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware: host, origin, token and body-size checks (see the module docstring).

    Args:
        app: the ASGI app to protect.
        token: the access token, or ``None`` for none.
        loopback: the server is bound to loopback (enables the Host check).
        max_body: the largest request body in bytes.
    """

    def __init__(self, app: Any, *, token: str | None, loopback: bool, max_body: int) -> None:
        self.app = app
        self.token = token
        self.loopback = loopback
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.loopback and not is_loopback(_hostname(host)):
            await _refuse(scope, send, 403, f"this server only answers to localhost, not to the host {host!r}")
            return
        origin = headers.get("origin")
        writes = scope["type"] == "websocket" or scope.get("method", "GET") not in _SAFE_METHODS
        if writes and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            await _refuse(scope, send, 403, f"cross-origin request from {origin!r} refused")
            return
        if self.token is not None:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            offered = dict(query).get("token")
            if offered is not None and scope["type"] == "http" and self._valid(offered):
                await _set_cookie_and_redirect(scope, send, [(k, v) for k, v in query if k != "token"], self.token)
                return
            if not self._valid(_presented(headers)):
                await _refuse(scope, send, 401, _missing_token(headers))
                return
        if scope["type"] == "http":
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await _refuse(scope, send, 413, f"request body over the limit of {self.max_body:,} bytes")
                return
            receive = self._limited(receive)
        await self.app(scope, receive, send)

    def _valid(self, presented: str | None) -> bool:
        return presented is not None and secrets.compare_digest(presented.encode(), self.token.encode())

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, f"request body over the limit of {self.max_body:,} bytes")
            return message

        return limited


def _presented(headers: dict[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE and value:
            return value
    return None


def _missing_token(headers: dict[str, str]) -> str:
    if "authorization" in headers or TOKEN_COOKIE in headers.get("cookie", ""):
        return "wrong access token"
    return (
        "this server needs its access token: send 'Authorization: Bearer TOKEN', or open the URL idfusion serve "
        "printed (it ends in ?token=...)"
    )


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="idfusion"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _set_cookie_and_redirect(scope: Scope, send: Send, query: list[tuple[str, str]], token: str) -> None:
    path = "/" + (scope.get("root_path", "") + scope.get("path", "/")).lstrip("/")  # never "//host": no open redirect
    location = path + (f"?{urlencode(query)}" if query else "")
    cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    headers = [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
