"""The floor of the HTTP stack: a raw ASGI app answering a fixed JSON body, no framework, no store.
Served by the same uvicorn as `cycles serve` (benchmarks/hotpath.py), it shows what one request costs
before any Cycles work."""

BODY = b'{"decision":"ALLOW","reservation_id":"rsv_0123456789abcdef01234567","affected_scopes":["tenant:bench"]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):  # noqa: ANN001, ANN201
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the request body, as a real endpoint must
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
