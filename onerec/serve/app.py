"""The HTTP app of `onerec serve`: FastAPI over one Recommender, with concurrent requests
gathered into one beam search (batcher.py).

    GET  /health           {"status": "ok", "model", "items", "device", "beam_width", ...}
    POST /recommend        {"history": [...], "user_id": 7, "k": 10, "exclude_history": false}
                           -> {"id": ..., "items": [{"item_id", "score", "title"}, ...]}
    POST /recommend/batch  {"requests": [<as above>, ...]}
                           -> {"results": [{"id", "items"} or {"id", "error"}, ...]}

Request fields are those of a request-file line (onerec/serve/jsonl.py); "id" is echoed.
Every request uses the server's beam width, so k may be 1..beam_width (default 10, or the
beam width when that is smaller). An empty history is valid (onerec/inference/recommend.py).

Errors are JSON {"error": "message"}, and the server keeps serving after each:
- 400 a body that is not JSON; 422 a body of the wrong shape (pydantic: field names and
  types), an unknown item id, k out of range, a history over max_history_items;
- 413 a body over max_body_bytes (limits.py), refused before it is read whole;
- 500 a search that failed for this request (batcher.py retries a failed batch one request
  at a time, so one bad request does not fail the others);
- 503 with Retry-After when max_queued requests are already waiting (the request is not
  queued; in /recommend/batch, an "error" entry for each request refused);
- /recommend/batch answers 200 with an "error" entry for each request that cannot be
  answered, as a request file does.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from onerec.inference.recommend import Recommendation, Recommender, Request
from onerec.serve.batcher import BatchError, Batcher, Overloaded
from onerec.serve.limits import BodySizeLimit

DEFAULT_K = 10
# Requests in one /recommend/batch body: more is a 422 (send several bodies).
MAX_BATCH_REQUESTS = 1024
# Defaults of the load limits (onerec serve --max-queued, --max-body-bytes).
DEFAULT_MAX_QUEUED = 1024
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Fields described in one error message; the rest are counted.
SHOWN_ERRORS = 5

ItemId = Union[StrictStr, StrictInt]


class RecommendBody(BaseModel):
    """One request (POST /recommend, or an entry of /recommend/batch)."""

    model_config = ConfigDict(extra="forbid")

    id: Any = None
    history: Optional[list[ItemId]] = None
    user_id: Optional[Union[StrictStr, StrictInt]] = None
    k: Optional[StrictInt] = None  # default: DEFAULT_K, or the beam width when that is smaller
    exclude_history: Optional[StrictBool] = None


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Entries are checked one by one (an error entry each), so only the list shape is typed here.
    requests: list[Any] = Field(max_length=MAX_BATCH_REQUESTS)


# The branch names pydantic puts in the location of a union member's error.
_UNION_BRANCHES = {"str": "a string", "int": "an integer", "bool": "true or false"}


def describe(err: ValidationError | RequestValidationError, prefix: str = "") -> str:
    """One line from pydantic's errors, a clause per field: 'history.1: expected a string or
    an integer, got 1.5; k: ...' (the errors of a union's branches merged into one clause)."""
    clauses: dict[str, list[str]] = {}
    branches: dict[str, tuple[list[str], Any]] = {}
    for error in err.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        kind = error.get("type", "")
        if location and location[-1] in _UNION_BRANCHES and kind.endswith("_type"):
            field = _field(prefix, location[:-1])
            branches.setdefault(field, ([], error.get("input")))[0].append(_UNION_BRANCHES[location[-1]])
            clauses.setdefault(field, [])
            continue
        if kind == "json_invalid":  # the location is the character offset
            reason = (error.get("ctx") or {}).get("error", "not JSON")
            clauses.setdefault("body", []).append(f"not valid JSON ({reason} at character {location[-1]})")
            continue
        clauses.setdefault(_field(prefix, location), []).append(_message(error))
    for field, (names, value) in branches.items():
        clauses[field].append(f"expected {' or '.join(names)}, got {_shown(value)}")
    parts = [f"{field}: {'; '.join(messages)}" for field, messages in clauses.items()]
    more = f"; and {len(parts) - SHOWN_ERRORS} more" if len(parts) > SHOWN_ERRORS else ""
    return "; ".join(parts[:SHOWN_ERRORS]) + more or "invalid request"


def _field(prefix: str, location: list[str]) -> str:
    """'requests.3.history.0' for prefix 'requests.3'; 'body' for the whole body."""
    return ".".join([prefix, *location] if prefix else location) or "body"


def _shown(value: Any, limit: int = 60) -> str:
    """A request value as JSON (it came from JSON), cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(error: dict) -> str:
    kind, value = error.get("type", ""), error.get("input")
    if kind == "extra_forbidden":
        return f"unknown field: expected {', '.join(RecommendBody.model_fields)}"
    if kind == "missing" and not [part for part in error.get("loc", ()) if part != "body"]:
        return 'missing: expected a JSON object such as {"history": ["ITEM"]}'
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if isinstance(value, (bytes, str)):  # FastAPI reads a body of another content type as text
            return "expected a JSON object, sent with Content-Type: application/json"
        return f"expected a JSON object, got {_shown(value)}"
    if kind.endswith("_type"):
        return f"{error.get('msg', 'invalid')}, got {_shown(value)}"
    return error.get("msg", "invalid")


def create_app(
    recommender: Recommender,
    beam_width: Optional[int] = None,
    max_batch_size: int = 64,
    max_wait_ms: float = 5.0,
    max_queued: int = DEFAULT_MAX_QUEUED,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app answering from `recommender` (loaded once, by the caller). beam_width: beams
    per request (None: the recommender's, else the export's eval.beam_width); k may be
    1..beam_width. max_queued: requests waiting at once before new ones get 503 (0: no
    limit); max_body_bytes: the largest request body (413 beyond)."""
    width = beam_width or recommender.beam_width or recommender.exported.cfg.eval.beam_width
    batcher: Batcher[Request, list[Recommendation]] = Batcher(
        recommender.run, max_batch_size, max_wait_ms / 1000, max_queued
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="onerec", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    def prepare(body: RecommendBody, where: str) -> Request:
        """The checked request; ValueError or TypeError naming `where` and the field."""
        if body.history is None and body.user_id is None:
            raise ValueError(f"{where}: history: missing (give a history, a user_id, or both)")
        k = min(DEFAULT_K, width) if body.k is None else body.k
        if not 1 <= k <= width:
            raise ValueError(f"{where}: k={k}: expected 1..{width} (the server's beam width, --beam-width)")
        return recommender.prepare(body.history or [], body.user_id, k, body.exclude_history, width, where)

    def answer(body: RecommendBody, items: list[Recommendation]) -> dict:
        return {"id": body.id, "items": [item.to_dict() for item in items]}

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
        not_json = any(error.get("type") == "json_invalid" for error in err.errors())
        return JSONResponse({"error": describe(err)}, status_code=400 if not_json else 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, err: HTTPException) -> JSONResponse:
        """Starlette's own errors (an unknown route, a body it cannot parse) as {"error": ...}."""
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": recommender.source,
            "items": recommender.num_items,
            "device": str(recommender.device),
            "beam_width": width,
            "max_history": recommender.max_history,
            "max_history_items": recommender.max_history_items,
            "user_ids": recommender.uses_user_ids,
            "exclude_history": recommender.exclude_history,
            "max_batch_size": batcher.max_batch_size,
            "max_wait_ms": batcher.max_wait_s * 1000,
            "max_queued": batcher.max_queued,
            "max_body_bytes": max_body_bytes,
            "queued": batcher.queued,  # requests waiting for a search now
            "searches": batcher.batches,  # beam searches run so far (fewer than requests when batched)
        }

    @app.post("/recommend")
    async def recommend(body: RecommendBody):
        try:
            request = prepare(body, "request")
        except (TypeError, ValueError) as err:
            return JSONResponse({"id": body.id, "error": str(err)}, status_code=422)
        try:
            return answer(body, await batcher.submit(request))
        except Overloaded as err:
            return JSONResponse({"id": body.id, "error": f"server busy: {err}; retry later"}, status_code=503,
                                headers={"Retry-After": "1"})
        except BatchError as err:
            return JSONResponse({"id": body.id, "error": f"the search failed: {err}"}, status_code=500)

    @app.post("/recommend/batch")
    async def recommend_batch(body: BatchBody) -> dict:
        async def one(index: int, entry: Any) -> dict:
            where = f"requests.{index}"
            try:
                parsed = RecommendBody.model_validate(entry)
            except ValidationError as err:
                return {"id": entry.get("id") if isinstance(entry, dict) else None, "error": describe(err, where)}
            try:
                request = prepare(parsed, where)
            except (TypeError, ValueError) as err:
                return {"id": parsed.id, "error": str(err)}
            try:
                return answer(parsed, await batcher.submit(request))
            except Overloaded as err:
                return {"id": parsed.id, "error": f"{where}: server busy: {err}; retry later"}
            except BatchError as err:
                return {"id": parsed.id, "error": f"{where}: the search failed: {err}"}

        return {"results": list(await asyncio.gather(*(one(i, entry) for i, entry in enumerate(body.requests))))}

    return app
