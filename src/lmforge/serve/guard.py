"""What happens to a request before anything reads its body: the outermost ASGI middleware of the server app.

- The API key: every route but the public ones (`/health`, the chat page and its static files) needs
  `Authorization: Bearer <api_key>`; a request without it is answered 401 at once, its body never read (other
  middleware, like the tools one, buffers bodies: they come after this).
- The body cap: a declared `Content-Length` over `max_request_bytes` is answered 413 without reading anything; a
  body without one (chunked) is counted as it arrives and refused the moment it passes the cap. A body within the
  cap is read here and handed on whole.
- A last resort for bugs: an exception that escapes the app before its response started becomes an OpenAI-schema
  500 here. Letting it reach uvicorn would close the client's keep-alive connection (so a pooled client's next
  request fails too).

Responses of this layer use OpenAI's error schema like the rest of the server.
"""
from __future__ import annotations

import hmac
import logging

from .protocol import OpenAIError

log = logging.getLogger("lmforge.serve")

PUBLIC_PATHS = frozenset({"/health", "/chat", "/"})
PUBLIC_PREFIXES = ("/chat/static/",)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class RequestGuard:
    """ASGI middleware: API key, body cap, last-resort 500 (see the module docstring)."""

    def __init__(self, app, api_key: str | None = None, max_request_bytes: int = 4 * 2**20):
        self.app, self.max_bytes = app, max_request_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and not is_public(scope["path"]):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _send(send, OpenAIError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"))
        if scope["method"] in _BODY_METHODS:
            try:
                body = await self._read_body(receive, headers.get(b"content-length"))
            except OpenAIError as e:
                return await _send(send, e)
            receive = replay_body(body, receive)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:  # a response half sent cannot be taken back: let uvicorn close the connection
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await _send(send, OpenAIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    async def _read_body(self, receive, declared: bytes | None) -> bytes:
        """The whole body, or OpenAIError 413 as soon as it is known to pass the cap."""
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(f"{int(declared)} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(f"over {self.max_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self, what: str) -> OpenAIError:
        return OpenAIError(413, f"the request body ({what}) exceeds the server's limit of {self.max_bytes} bytes "
                                "(serve option max_request_bytes)", code="request_too_large")


async def _send(send, error: OpenAIError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def replay_body(body: bytes, receive):
    """A receive that hands over `body` once, then waits on the client's (so a disconnect still shows)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
