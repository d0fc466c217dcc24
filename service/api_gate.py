"""The API's ASGI middleware: the token and body gate (`Gate`), and 500s without a traceback
(`InternalErrors`). Both answer with `error()`, the API's one error body."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid

from fastapi.responses import JSONResponse

from service.settings import ApiSettings

log = logging.getLogger("wherefrom.api")


class Gate:
    """ASGI middleware that answers before the app reads a body byte: 401 without the token (every
    path but `open_paths`), 413 for a declared length over the limit, 503 when `max_uploads` bodies
    are already coming in. Then it counts the body as it streams (413 past the limit) and allows
    `read_timeout` seconds between chunks (408). Every refusal closes the connection, so a client
    that stalls holds neither a buffer nor a socket: 8 MiB per token-less request used to be read
    first.
    """

    def __init__(self, app, api: ApiSettings, open_paths: frozenset[str]):
        self.app, self.api, self.open_paths = app, api, open_paths
        self.receiving = 0  # bodies being received now; one event loop, so no lock

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        refusal = self._refusal(scope["path"], headers, has_body)
        if refusal is not None:
            return await _answer_now(send, *refusal)
        if not has_body:
            return await self.app(scope, receive, send)
        self.receiving += 1
        body = _Body(receive, send, self.api, release=self._release)
        try:
            await self.app(scope, body.receive, body.send)
        finally:
            body.finish()

    def _release(self) -> None:
        self.receiving -= 1

    def _refusal(self, path: str, headers: dict, has_body: bool) -> tuple | None:
        if path not in self.open_paths and not self._authorized(headers.get(b"authorization", b"")):
            return 401, ("missing or wrong bearer token: send `Authorization: Bearer $WHEREFROM_API_TOKEN`",
                         {"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.api.max_body_bytes:
            return 413, (_too_large(self.api.max_body_bytes), {})
        if has_body and self.receiving >= self.api.max_uploads:
            return 503, (f"{self.api.max_uploads} uploads are already coming in: retry in a few seconds, "
                         "or raise WHEREFROM_API_MAX_UPLOADS", {"Retry-After": "5"})
        return None

    def _authorized(self, authorization: bytes) -> bool:
        scheme, _, given = authorization.partition(b" ")
        # constant time: the comparison does not reveal how many leading characters were right
        return hmac.compare_digest(given, self.api.token.encode()) and scheme.lower() == b"bearer"


class _Body:
    """One request's body as the app reads it: counted, and timed between chunks."""

    def __init__(self, receive, send, api: ApiSettings, release):
        self._receive, self._send, self.api, self._release = receive, send, api, release
        self.size, self.done, self.refused, self.started = 0, False, False, False

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}  # the app stops; its answer is dropped in `send`
        if self.done:  # after the body, a wait for the client to go away has no deadline
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.api.read_timeout)
        except asyncio.TimeoutError:
            return await self._refuse(408, f"no body bytes for {self.api.read_timeout:g} s: send the body "
                                           "without pausing, or raise WHEREFROM_API_READ_TIMEOUT")
        self.size += len(message.get("body", b""))
        if self.size > self.api.max_body_bytes:
            return await self._refuse(413, _too_large(self.api.max_body_bytes))
        if message["type"] != "http.request" or not message.get("more_body"):
            self.finish()
        return message

    async def send(self, message):
        if not self.refused:
            self.started = self.started or message["type"] == "http.response.start"
            await self._send(message)

    async def _refuse(self, status: int, message: str):
        self.finish()
        if not self.started:
            self.refused = True
            await _answer_now(self._send, status, (message, {}))
        return {"type": "http.disconnect"}

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self._release()


async def _answer_now(send, status: int, reason: tuple[str, dict]) -> None:
    """Answer `status` without reading the body, and have the server close the connection."""
    message, headers = reason
    response = error(status, message, {**headers, "Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _too_large(max_bytes: int) -> str:
    return (f"request body over {max_bytes} bytes: send fewer documents per request, "
            "or raise WHEREFROM_API_MAX_BODY_BYTES")


class InternalErrors:
    """ASGI middleware: an exception that escapes the app is a bug. It is logged with a short id and
    answered `{"error": "internal error <id>: see the server log"}` (500), never a traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error %s on %s %s", ref, scope["method"], scope["path"])
            if not started:
                await error(500, f"internal error {ref}: see the server log")(scope, receive, send)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
