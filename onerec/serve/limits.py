"""Request-body size limit of `onerec serve`, as an ASGI middleware.

Without it a client could send a body of any size and the server would read all of it into
memory before pydantic looked at it. A body declared larger than the limit (Content-Length)
is refused without being stored; a body sent without a length (chunked) is counted as it
arrives and refused once it passes the limit. Either way the answer is 413 with
{"error": "..."}, like every other error of the server, and the app never sees the request.

Before answering, the rest of the body is read and dropped (up to DRAIN_BYTES): a client that
sends its whole body before it reads the answer (urllib, requests) would otherwise find the
connection reset and never see the 413.
"""

from __future__ import annotations

import json

# Bytes of a refused body read and dropped before the answer; past this the connection closes.
DRAIN_BYTES = 64 << 20


class BodySizeLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive, 0, more=True)
            await self._refuse(send, int(declared))
            return
        received = 0
        refused = False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    received = await self._drain(receive, received, message.get("more_body", False))
                    await self._refuse(send, received)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded_send(message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:  # the app's own failure: not ours to hide
                raise

    @staticmethod
    async def _drain(receive, received: int, more: bool) -> int:
        """Read and drop the rest of the body (up to DRAIN_BYTES); the bytes seen in all."""
        drained = 0
        while more and drained < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        return received + drained

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(
            {"error": f"request body of {size:,} bytes or more is over the server's limit of {self.max_bytes:,} bytes "
                      "(--max-body-bytes); send fewer requests per body"}
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
