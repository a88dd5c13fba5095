"""stream_reservation (sync and async) with a caller-supplied idempotency key.
Modes: sync_ok, sync_fail, async_ok, async_fail."""

from __future__ import annotations

import asyncio
from typing import Any

from _common import config, emit, exc_info, flush_sync_engines, journal_files, params

from runcycles import Action, Amount, AsyncCyclesClient, CyclesClient, Unit

p = params()
mode = p["mode"]
key = p["key"]
action = Action(kind="llm.completion", name="conformance-stream")
estimate = Amount(unit=Unit.USD_MICROCENTS, amount=p["estimate"])
per_token = p["per_output_token"]
out: dict[str, Any] = {"mode": mode, "reservation_id": None, "error": None, "settlement_error": None}


class StreamBroke(RuntimeError):
    pass


def consume(stream: Any) -> None:
    out["reservation_id"] = stream.reservation_id
    out["decision"] = str(getattr(stream.decision, "value", stream.decision))
    for _ in range(3):
        stream.usage.add_output_tokens(p["tokens_per_chunk"])
    stream.usage.add_input_tokens(7)
    if mode.endswith("_fail"):
        raise StreamBroke("the provider stream broke")


if mode.startswith("sync"):
    client = CyclesClient(config(p))
    stream = client.stream_reservation(action=action, estimate=estimate, idempotency_key=key,
                                       cost_fn=lambda u: u.tokens_output * per_token)
    try:
        with stream as s:
            consume(s)
    except BaseException as exc:  # noqa: BLE001
        out["error"] = exc_info(exc)
    out["settlement_error"] = exc_info(stream.settlement_error)
    out["release_error"] = exc_info(stream.release_error)
    flush_sync_engines(2.0)
    client.close()
else:
    async def main() -> None:
        async with AsyncCyclesClient(config(p)) as aclient:
            stream = aclient.stream_reservation(action=action, estimate=estimate, idempotency_key=key,
                                                cost_fn=lambda u: u.tokens_output * per_token)
            try:
                async with stream as s:
                    consume(s)
            except BaseException as exc:  # noqa: BLE001
                out["error"] = exc_info(exc)
            out["settlement_error"] = exc_info(stream.settlement_error)
            out["release_error"] = exc_info(stream.release_error)

    asyncio.run(main())

out["journal_files"] = journal_files(p)
emit(out)
