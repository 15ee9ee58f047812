"""The endpoint the bench's remediations call, in a process of its own (uvicorn, raw ASGI).

``POST /call/<seq>`` records (path, Idempotency-Key, receipt time) and answers 204;
``GET /count`` and ``GET /calls`` report; ``POST /reset`` forgets.

    python bench/target.py PORT
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import uvicorn

calls: list[tuple[str, str, float]] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    while (await receive()).get("more_body"):
        pass
    body = b""
    status = 204
    if path.startswith("/call/"):
        key = next((v.decode() for k, v in scope["headers"] if k == b"idempotency-key"), "")
        calls.append((path, key, time.time()))
    elif path == "/count":
        body, status = json.dumps({"count": len(calls)}).encode(), 200
    elif path == "/calls":
        rows = [{"path": p, "key": k, "at": t} for p, k, t in calls]
        body, status = json.dumps({"calls": rows}).encode(), 200
    elif path == "/reset":
        calls.clear()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
