"""A local stand-in for the OpenAI and Anthropic HTTP APIs (Starlette on a loopback port).

It answers `/v1/chat/completions`, `/v1/responses` and `/v1/messages` with the providers' body shapes,
usage objects and SSE event streams, and records every request it receives (so a test can assert that a
denied reservation sent nothing). Usage is a pure function of the request: `usage_for(body)`.
A message containing "PLEASE FAIL" gets a 400 error body; "FAIL MIDSTREAM" breaks a stream after one chunk.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TEXT = ["Budgets ", "are ", "enforced ", "before ", "the ", "call."]


@dataclass
class Recorded:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeProvider:
    requests: list[Recorded] = field(default_factory=list)
    base_url: str = ""

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path == path)

    def last(self) -> Recorded:
        return self.requests[-1]


def _text(body: dict[str, Any]) -> str:
    return json.dumps([body.get("messages"), body.get("input"), body.get("system"), body.get("instructions")])


def usage_for(body: dict[str, Any]) -> dict[str, int]:
    """Deterministic token counts for a request: prompt ~ a quarter of its JSON size, cache hits above 40."""
    prompt = len(_text(body)) // 4 + 11
    cached = (prompt // 2) if prompt > 40 else 0
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 1000
    out = min(int(limit), 37)
    return {"prompt": prompt, "cached": cached, "output": out, "cache_write": 5 if prompt > 40 else 0}


def _sse(events: list[tuple[str | None, Any]], fail_after: int | None = None):
    async def gen():
        for i, (name, data) in enumerate(events):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("provider dropped the connection")
            payload = data if isinstance(data, str) else json.dumps(data)
            yield (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def _dated(model: str) -> str:
    return {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}.get(model, model)


def _error(provider: str) -> Response:
    if provider == "anthropic":
        return JSONResponse({"type": "error", "error": {"type": "invalid_request_error", "message": "asked to fail"}},
                            status_code=400)
    return JSONResponse({"error": {"message": "asked to fail", "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=400)


def make_app(state: FakeProvider) -> Starlette:
    async def record(request: Request) -> dict[str, Any]:
        body = await request.json()
        state.requests.append(Recorded(request.url.path, body, dict(request.headers)))
        return body

    async def chat(request: Request) -> Response:
        body = await record(request)
        if "PLEASE FAIL" in _text(body):
            return _error("openai")
        u = usage_for(body)
        model = _dated(body["model"])
        usage = {"prompt_tokens": u["prompt"], "completion_tokens": u["output"],
                 "total_tokens": u["prompt"] + u["output"], "prompt_tokens_details": {"cached_tokens": u["cached"]},
                 "completion_tokens_details": {"reasoning_tokens": 0}}
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        tier = body.get("service_tier") or "default"
        if not body.get("stream"):
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model, "service_tier": tier,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "".join(TEXT), "refusal": None}}],
                "usage": usage, "system_fingerprint": "fp_fake"})
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "service_tier": tier, "system_fingerprint": "fp_fake"}
        events: list[tuple[str | None, Any]] = [
            (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})]
        events += [(None, {**base, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})
                   for t in TEXT]
        events.append((None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**base, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return _sse(events, 2 if "FAIL MIDSTREAM" in _text(body) else None)

    async def responses(request: Request) -> Response:
        body = await record(request)
        if "PLEASE FAIL" in _text(body):
            return _error("openai")
        u = usage_for(body)
        rid = f"resp_{uuid.uuid4().hex[:12]}"
        model = _dated(body["model"])
        usage = {"input_tokens": u["prompt"], "input_tokens_details": {"cached_tokens": u["cached"]},
                 "output_tokens": u["output"], "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": u["prompt"] + u["output"]}
        msg = {"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "".join(TEXT), "annotations": []}]}
        resp = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": model, "output": [msg], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": usage, "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
                "temperature": 1.0, "top_p": 1.0, "service_tier": body.get("service_tier") or "default"}
        if not body.get("stream"):
            return JSONResponse(resp)
        pending = {**resp, "status": "in_progress", "output": [], "usage": None}
        events: list[tuple[str | None, Any]] = [
            ("response.created", {"type": "response.created", "sequence_number": 0, "response": pending})]
        for i, t in enumerate(TEXT):
            events.append(("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": i + 1, "item_id": msg["id"],
                "output_index": 0, "content_index": 0, "delta": t, "logprobs": []}))
        events.append(("response.completed", {"type": "response.completed", "sequence_number": len(TEXT) + 1,
                                              "response": resp}))
        return _sse(events, 2 if "FAIL MIDSTREAM" in _text(body) else None)

    async def messages(request: Request) -> Response:
        body = await record(request)
        if "PLEASE FAIL" in _text(body):
            return _error("anthropic")
        u = usage_for(body)
        mid = f"msg_{uuid.uuid4().hex[:12]}"
        last = body["messages"][-1]
        tool_turn = bool(body.get("tools")) and not (
            isinstance(last.get("content"), list) and any(b.get("type") == "tool_result" for b in last["content"]))
        if tool_turn:
            content = [{"type": "tool_use", "id": f"toolu_{mid}", "name": body["tools"][0]["name"],
                        "input": {"city": "Paris"}}]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": "".join(TEXT)}]
            stop = "end_turn"
        # Anthropic's input_tokens excludes cache reads and writes
        usage = {"input_tokens": u["prompt"] - u["cached"] - u["cache_write"], "output_tokens": u["output"],
                 "cache_read_input_tokens": u["cached"], "cache_creation_input_tokens": u["cache_write"]}
        msg = {"id": mid, "type": "message", "role": "assistant", "model": body["model"], "content": content,
               "stop_reason": stop, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return JSONResponse(msg)
        start = {**msg, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events: list[tuple[str | None, Any]] = [("message_start", {"type": "message_start", "message": start})]
        if tool_turn:
            block = content[0]
            events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {**block, "input": {}}}))
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}}))
            events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": t}}) for t in TEXT]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        # message_delta's usage is cumulative and, as the API sends it now, repeats the input and cache counts
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                                                            "stop_sequence": None},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return _sse(events, 2 if "FAIL MIDSTREAM" in _text(body) else None)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/responses", responses, methods=["POST"]),
                             Route("/v1/messages", messages, methods=["POST"])])


class FakeProviderServer:
    """uvicorn serving `make_app` on 127.0.0.1 in a daemon thread."""

    def __init__(self, port: int) -> None:
        self.state = FakeProvider(base_url=f"http://127.0.0.1:{port}")
        config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-provider", daemon=True)

    def start(self) -> "FakeProviderServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
