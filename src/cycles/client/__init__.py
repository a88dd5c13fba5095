"""Cycles Python SDK: `from cycles.client import CyclesClient, cycles, ...`.

Drop-in for the published `runcycles` names (clients, config, decorator, context, streaming,
exceptions, models) with typed models from `cycles.protocol.models` (the one wire definition).
See docs/sdk.md.
"""

from ..protocol.models import (Action, Amount, Balance, BalanceResponse, Caps, CommitRequest, CommitResponse,
                               DecisionRequest, DecisionResponse, EventCreateRequest, EventCreateResponse,
                               ReleaseRequest, ReleaseResponse, ReservationCreateRequest, ReservationCreateResponse,
                               ReservationDetail, ReservationExtendRequest, ReservationExtendResponse,
                               ReservationListResponse, ReservationSummary, SignedAmount, StandardMetrics, Subject)
from .aio import AsyncCyclesClient
from .config import CyclesConfig
from .context import CyclesContext, CyclesMetrics, HeartbeatEvent, get_cycles_context
from .decorator import cycles, set_default_client, set_default_config
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .recovery import Outcome, RecoveryReport
from .streaming import AsyncStreamReservation, StreamReservation, StreamUsage
from .sync import CyclesClient

DryRunResult = ReservationCreateResponse

__all__ = [
    "CyclesClient", "AsyncCyclesClient", "CyclesConfig", "cycles", "set_default_client", "set_default_config",
    "CyclesContext", "CyclesMetrics", "HeartbeatEvent", "get_cycles_context", "StreamReservation",
    "AsyncStreamReservation", "StreamUsage", "Outcome", "RecoveryReport", "DryRunResult", "Action", "Amount",
    "Balance", "BalanceResponse", "Caps", "CommitRequest", "CommitResponse", "DecisionRequest", "DecisionResponse",
    "EventCreateRequest", "EventCreateResponse", "ReleaseRequest", "ReleaseResponse", "ReservationCreateRequest",
    "ReservationCreateResponse", "ReservationDetail", "ReservationExtendRequest", "ReservationExtendResponse",
    "ReservationListResponse", "ReservationSummary", "SignedAmount", "StandardMetrics", "Subject",
    *_errors_all,
]
