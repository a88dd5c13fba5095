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
        self.extra: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "no"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=open(self.directory / "redis.log", "ab"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent if self.extra else None)
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


def _die_with_parent() -> None:
    """A cluster node ends with the test process that started it, even one killed without teardown."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes:
    """A real Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each, made by
    `redis-cli --cluster create` (as an operator would)."""

    def __init__(self, directory: Path, *, primaries: int = 3, replicas: int = 1, appendonly: bool = False,
                 node_timeout_ms: int = 15000) -> None:
        # A node silent for node_timeout_ms is failed over. The failover test wants that fast; every other test
        # wants it never: on a loaded CI machine a 1 s timeout promoted replicas of healthy primaries mid-test,
        # and the writes the old primary had not yet replicated were lost (async replication, as in production).
        self.directory = directory
        self.primaries, self.replicas, self.appendonly = primaries, replicas, appendonly
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:self.primaries]) + "/"

    def start(self) -> "RedisClusterNodes":
        cli = shutil.which("redis-cli") or str(Path(redis_binary()).with_name("redis-cli"))
        for i in range(self.primaries * (1 + self.replicas)):
            node = RedisServer(self.directory / f"node{i}", appendonly=self.appendonly, port=_cluster_port())
            node.extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", str(self.node_timeout_ms)]
            self.nodes.append(node.start())
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)
        self.wait_ok()
        self.wait_replicas()
        return self

    def wait_replicas(self, timeout_s: float = 30) -> None:
        """Until every primary has its replicas online (their first sync done), so WAIT can count them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = 0
            for n in self.nodes:
                info = redis.Redis(port=n.port, socket_connect_timeout=0.5).info("replication")
                if info.get("role") != "master":
                    continue
                online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                          and v.get("state") == "online"]
                ready += len(online) >= self.replicas
            if ready == self.primaries:
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster's replicas did not come online")

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every primary node reports the cluster ok with all slots served."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                states = []
                for n in self.nodes:
                    if n.proc is None or n.proc.poll() is not None:
                        continue
                    info = redis.Redis(port=n.port, socket_connect_timeout=0.5).cluster("INFO")
                    states.append(info.get("cluster_state") == "ok" and str(info.get("cluster_slots_ok")) == "16384")
                if states and all(states):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ok")

    def wait_failover(self, dead_port: int, timeout_s: float = 30) -> None:
        """Until a live node maps every slot the dead primary served to another node (its promoted replica)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for n in self.nodes:
                if n.port == dead_port or n.proc is None or n.proc.poll() is not None:
                    continue
                try:
                    slots = redis.Redis(port=n.port, socket_connect_timeout=0.5).cluster("SLOTS")
                except redis.RedisError:
                    continue
                if slots and all(int(s[2][1]) != dead_port for s in slots):
                    self.wait_ok(timeout_s=max(1.0, deadline - time.monotonic()))
                    return
                break
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not fail over")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def flush_cluster(url: str) -> None:
    """Empties every primary of a cluster (a store test's fresh start, as FLUSHDB on one primary)."""
    from redis.cluster import ClusterNode, RedisCluster

    from cycles.store.redis_cluster import cluster_nodes

    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(url)])
    try:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
    finally:
        client.close()
