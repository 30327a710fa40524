"""An impaired network link on loopback: a TCP proxy (pure asyncio) that adds delay, jitter, loss, a rate
limit, stalls and connection resets between the edge and the server.

This kernel has no ``netem`` qdisc, so impairment is done in user space. Loss cannot be per packet
through a TCP proxy; a lost segment shows up to the application as the segment arriving one
retransmission timeout late, which is what ``loss`` does (each chunk, with that probability, is
held ``retransmit_ms`` longer). Order within a connection is always kept, as TCP keeps it.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Impairment:
    """What the link does to each direction of every connection.

    delay_ms, jitter_ms: one-way delay of each chunk, plus uniform [0, jitter_ms). rate_bps: bits
    per second per direction (None = unlimited). loss: probability that a chunk is held another
    ``retransmit_ms`` (a lost and retransmitted segment). reset: probability per chunk that the
    connection is reset. stalled: nothing is forwarded while set (bytes queue up, as on a link
    that went dark).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_bps: float | None = None
    loss: float = 0.0
    retransmit_ms: float = 200.0
    reset: float = 0.0
    stalled: bool = False

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.retransmit_ms < 0:
            raise ValueError("delays must be >= 0")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate_bps must be > 0 or None, got {self.rate_bps}")
        if not (0 <= self.loss <= 1 and 0 <= self.reset <= 1):
            raise ValueError("loss and reset are probabilities")


class LinkProxy:
    """Listens on 127.0.0.1 (port 0) and forwards each connection to ``target_port``, impaired.

    ``start()`` runs it on its own event loop thread; ``impair(**fields)`` changes the impairment
    for bytes forwarded from then on; ``reset_all()`` resets every open connection; ``stop()``.
    """

    def __init__(self, target_port: int, impairment: Impairment = Impairment(), seed: int = 0) -> None:
        self.target_port = target_port
        self.impairment = impairment
        self.port = 0
        self.connections = 0
        self.resets = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "LinkProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def impair(self, **fields) -> None:
        self.impairment = replace(self.impairment, **fields)

    def reset_all(self) -> None:
        self._loop.call_soon_threadsafe(self._abort_all)

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            self._abort_all()
            await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "LinkProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self.resets += bool(self._writers)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # nothing listens behind the link: the client sees a reset, as through a router
            client_writer.transport.abort()
            return
        self.connections += 1
        pair = (client_writer, server_writer)
        self._writers.update(pair)
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer, pair),
                                 self._pipe(server_reader, client_writer, pair))
        finally:
            for writer in pair:
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair) -> None:
        """One direction: read chunks, deliver each after its delay, at the rate limit, in order."""
        queue: asyncio.Queue = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(queue, writer, pair))
        try:
            while True:
                try:
                    data = await reader.read(16384)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                imp = self.impairment
                hold_ms = imp.delay_ms + self._rng.uniform(0, imp.jitter_ms)
                if self._rng.random() < imp.loss:
                    hold_ms += imp.retransmit_ms
                await queue.put((time.monotonic() + hold_ms / 1e3, data))
        finally:
            await queue.put(None)
            await deliver

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, pair) -> None:
        await self._forward(queue, writer, pair)
        if not writer.transport.is_closing() and writer.can_write_eof():
            writer.write_eof()  # the sender closed its side: pass the half-close on

    async def _forward(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, pair) -> None:
        last_at = free_at = 0.0
        while (item := await queue.get()) is not None:
            due, data = item
            last_at = max(due, last_at)  # TCP keeps order: a held chunk holds those behind it
            while self.impairment.stalled or time.monotonic() < last_at:
                await asyncio.sleep(min(max(last_at - time.monotonic(), 0.0), 0.01) or 0.005)
            rate = self.impairment.rate_bps
            if rate is not None:
                free_at = max(free_at, time.monotonic()) + 8 * len(data) / rate
                await asyncio.sleep(max(free_at - time.monotonic(), 0.0))
            if self._rng.random() < self.impairment.reset:
                for w in pair:
                    w.transport.abort()
                self.resets += 1
                return
            if writer.transport.is_closing():
                return
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
