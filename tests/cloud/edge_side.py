"""The edge half for server-side robustness tests: the tiny model's device session, inputs, a load loop."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.session import DeviceSession
from splitinfer.protos import Manifest, load_manifest


def edge_manifest(model_dir: Path) -> Manifest:
    return load_manifest(model_dir, need=("device",))


def device_session(manifest: Manifest) -> DeviceSession:
    return DeviceSession.from_manifest(manifest)


def sparse_images(manifest: Manifest, count: int, seed: int = 0) -> np.ndarray:
    """uint8 (count, H, W): a few bright strokes on black, like cluttered digits."""
    h, w = manifest.preprocessing.height, manifest.preprocessing.width
    rng = np.random.default_rng(seed)
    out = np.zeros((count, h, w), dtype=np.uint8)
    for img in out:
        for _ in range(6):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[y:y + 8, x:x + 3] = rng.integers(128, 256)
    return out


@dataclass
class Outcome:
    """One classify call: when it was made and ended (time.monotonic), what the edge answered, the whole
    call's latency and the offload call's round trip (``server_ms``, None when nothing was sent)."""

    sent_at: float
    done_at: float
    decided_on: str
    latency_ms: float
    error: str | None
    server_ms: float | None = None
    device_ms: float = 0.0


@dataclass
class LoadRun:
    """Threads that classify inputs back to back until ``stop``; every call's outcome is kept.

    ``attempts`` counts calls started; a call that raised or never returned is *lost*
    (``attempts - len(outcomes)``): the edge must answer every one, from the server or degraded.
    """

    runner: EdgeRunner
    images: np.ndarray
    threads: int = 2
    pause_s: float = 0.002
    max_calls: int = 100_000
    outcomes: list[Outcome] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    attempts: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(self.threads)]

    def start(self) -> "LoadRun":
        for worker in self._workers:
            worker.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop and join; False if a worker is still stuck in a call after ``timeout_s``."""
        self._stop.set()
        end = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(end - time.monotonic(), 0.0))
        return not any(w.is_alive() for w in self._workers)

    def _work(self, index: int) -> None:
        i = index
        while not self._stop.is_set():
            with self._lock:
                if self.attempts >= self.max_calls:
                    return
                self.attempts += 1
            sent_at = time.monotonic()
            try:
                result = self.runner.classify(self.images[i % len(self.images)])
            except Exception as exc:  # the edge must never raise: counted as lost
                with self._lock:
                    self.raised.append(f"{type(exc).__name__}: {exc}")
            else:
                with self._lock:
                    self.outcomes.append(Outcome(sent_at, time.monotonic(), result.decided_on, result.latency_ms,
                                                 result.error, result.server_ms, result.device_ms))
            i += self.threads
            time.sleep(self.pause_s)

    @property
    def lost(self) -> int:
        return self.attempts - len(self.outcomes)

    def past_deadline(self, deadline_s: float, margin_ms: float) -> list[Outcome]:
        """Calls whose offload round trip passed ``deadline_s`` by more than ``margin_ms``."""
        return [o for o in self.outcomes if o.server_ms is not None and o.server_ms > deadline_s * 1e3 + margin_ms]

    def count(self, decided_on: str, since: float = 0.0) -> int:
        return sum(o.decided_on == decided_on and o.sent_at >= since for o in self.outcomes)
