"""The gateway process: listeners, the admin port, the revocation feed, the shipper beside it,
and a graceful drain on SIGTERM (stop accepting, let sessions finish for a bounded time, end the
rest, flush the spool)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_plane import metrics
from data_plane.admin_http import start_admin_server
from data_plane.config import GatewayConfig
from data_plane.core.context import GatewayContext, server_tls_context
from data_plane.core.control_plane_client import ControlPlaneClient, ControlPlaneError
from data_plane.core.credentials import CredentialBroker
from data_plane.core.grants import GrantAuthority
from data_plane.core.registry import SessionRegistry
from data_plane.core.sealed import BreakGlassKey
from data_plane.core.spool import Spool, read_json, wait_background
from data_plane.core.stream import Stream
from data_plane.postgres.session import PostgresSession

log = logging.getLogger("proctor.gateway")


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        client = ControlPlaneClient(config.api_url, region=config.api_region or config.region)
        tls = server_tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        if tls is None and config.pg_require_tls:
            raise ValueError("TLS is required for clients but no certificate is configured (PROCTOR_TLS_CERT/KEY)")
        self.ctx = GatewayContext(
            config=config,
            authority=GrantAuthority(client, revocation_poll_interval=config.revocation_poll_seconds),
            credentials=CredentialBroker(client),
            spool=Spool(Path(config.spool_dir), fsync_interval=config.fsync_interval_seconds),
            registry=SessionRegistry(),
            tls=tls,
            sealing=BreakGlassKey.from_config(config),
        )
        self.ctx.registry.on_change(metrics.ACTIVE_SESSIONS.set)
        self.ctx.authority.on_revoked(self.ctx.registry.revoke)
        self.servers: list[asyncio.Server] = []
        self.session_tasks: set[asyncio.Task[None]] = set()
        self.background: list[asyncio.Task[None]] = []
        self.shipper: subprocess.Popen[bytes] | None = None
        self.keys_loaded = False
        self.stopping = asyncio.Event()

    # ------------------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.ctx.draining:
            return False, "draining"
        if not self.keys_loaded:
            return False, "grant keys not loaded"
        if not self.servers:
            return False, "listeners not started"
        return True, "ready"

    def accept_postgres(self) -> Stream:
        # Held: the session peeks at the first byte (a direct TLS handshake, or a startup packet).
        return Stream(on_connected=self.start_postgres_session, hold=True)

    def start_postgres_session(self, stream: Stream) -> None:
        task = asyncio.get_running_loop().create_task(PostgresSession(self.ctx, stream).run())
        self.session_tasks.add(task)  # also what keeps the task alive
        task.add_done_callback(self.session_tasks.discard)

    async def load_keys(self) -> None:
        while not self.keys_loaded:
            try:
                await self.ctx.authority.refresh_keys(force=True)
                self.keys_loaded = True
            except ControlPlaneError as exc:
                log.warning("grant keys unavailable (%s); retrying", exc)
                await asyncio.sleep(2)

    async def start(self) -> None:
        await self.load_keys()
        self.start_shipper()
        host, port = self.config.pg_address
        self.servers.append(await asyncio.get_running_loop().create_server(
            self.accept_postgres, host, port, backlog=1024, reuse_address=True))
        admin_host, admin_port = self.config.admin_address
        self.admin = await start_admin_server(admin_host, admin_port, self.ready)
        self.background += [
            asyncio.create_task(self.ctx.authority.watch_revocations(), name="revocations"),
            asyncio.create_task(self.watch_spool(), name="spool-metrics"),
        ]
        log.info("gateway listening: postgres %s:%s, admin %s:%s", host, port, admin_host, admin_port)

    def start_shipper(self) -> None:
        if not self.config.run_shipper:
            return
        self.shipper = subprocess.Popen(
            [sys.executable, "-m", "data_plane.shipper", "--spool", self.config.spool_dir,
             "--recordings-bucket", self.config.recordings_bucket, "--evidence-bucket", self.config.evidence_bucket,
             "--region", self.config.region, "--s3-region", self.config.evidence_region or self.config.region,
             "--interval", str(self.config.ship_interval_seconds),
             "--recording-delay", str(self.config.recording_ship_seconds)],
            stdin=subprocess.DEVNULL,
        )

    async def watch_spool(self) -> None:
        while True:
            await asyncio.sleep(5)
            try:
                metrics.SPOOL_BACKLOG.set(await asyncio.to_thread(self.ctx.spool.backlog_bytes))
                metrics.SHIPPING_LAG.set(await asyncio.to_thread(self._shipping_lag))
            except OSError:
                pass
            if self.shipper is not None and self.shipper.poll() is not None and not self.ctx.draining:
                log.error("shipper exited with %s; restarting it", self.shipper.returncode)
                metrics.ERRORS.labels("shipper").inc()
                self.start_shipper()

    def _shipping_lag(self) -> float:
        oldest = 0.0
        now = time.time()
        for directory in self.ctx.spool.sessions_dir.iterdir():
            shipped = read_json(directory / "shipped.json")
            meta = read_json(directory / "meta.json") or {}
            since = float((shipped or {}).get("shipped_at") or meta.get("started_at") or now)
            oldest = max(oldest, now - since)
        return oldest

    # ------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        self.ctx.draining = True
        log.info("draining: %d live sessions", len(self.session_tasks))
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + self.config.drain_seconds
        while self.session_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.ctx.registry.terminate_all("57P01", "terminating connection: the Proctor gateway is shutting down")
        if self.session_tasks:
            await asyncio.wait(list(self.session_tasks), timeout=5)
        for task in self.background:
            task.cancel()
        self.admin.close()
        await asyncio.to_thread(wait_background)  # every ended session sealed and marked closed
        self.stop_shipper()

    def stop_shipper(self) -> None:
        if self.shipper is None or self.shipper.poll() is not None:
            return
        self.shipper.send_signal(signal.SIGTERM)  # it flushes the spool, then exits
        try:
            self.shipper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.shipper.kill()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        await self.stopping.wait()
        await self.drain()


def run(config: GatewayConfig) -> None:
    logging.basicConfig(level=os.environ.get("PROCTOR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    gateway = Gateway(config)
    try:
        if config.event_loop == "uvloop":
            import uvloop

            uvloop.run(gateway.serve_forever())
        else:
            asyncio.run(gateway.serve_forever())
    finally:
        with contextlib.suppress(Exception):
            gateway.stop_shipper()
