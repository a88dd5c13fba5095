"""Derived governance events: the analyzers that find threshold crossings, burn-rate anomalies,
rate spikes, expired keys, high latency and store outages, and emit each exactly once whatever the
number of server processes (see `cycles.events.analyzer`)."""

from .analyzer import Analyzer, run_analyzers
from .config import AnalyzerConfig, parse_config
from .health import StoreHealthWatcher
from .matching import subscription_wants

__all__ = ["Analyzer", "AnalyzerConfig", "StoreHealthWatcher", "parse_config", "run_analyzers", "subscription_wants"]
