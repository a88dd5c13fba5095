"""A real redis-server on a free loopback port, for the Redis store's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from support import free_port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.environ.get("CI"):
        raise RuntimeError("redis-server is required in CI (.ci/run installs Debian's redis-server)")
    pytest.skip("redis-server is not installed (apt-get install redis-server); CI installs it")
    raise AssertionError  # unreachable


class RedisServer:
    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "no"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=open(self.directory / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
