"""Dynamic batching of ragged token sets: padding is exact, batches form, deadlines drop, the queue is bounded."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from splitinfer.cloud import BatchConfig, ModelBatcher, decode_and_run, length_buckets, pad_tokens, run_batch
from splitinfer.protos import CodecConfig, DeadlineExceeded, InvalidPacket, Overloaded, encode_tokens

from .conftest import BlockingSession, random_tokens, with_session


def _rows(manifest, counts) -> list[np.ndarray]:
    return [random_tokens(manifest, k, seed=i)[0] for i, k in enumerate(counts)]


def _packets(manifest, counts):
    """(token rows float32 (K, d), their fp32 packets) for requests of the given token counts."""
    made = [random_tokens(manifest, k, seed=i) for i, k in enumerate(counts)]
    return [t for t, _ in made], [encode_tokens(t, p, CodecConfig("fp32", "none")) for t, p in made]


def test_decode_and_run_fails_only_the_bad_packet(tiny_registry, tiny_manifest) -> None:
    (model,) = list(tiny_registry)
    rows, packets = _packets(tiny_manifest, [3, 4, 5])
    packets[1].num_tokens = 0
    outcomes, decode_ms, compute_ms = decode_and_run(model, packets)
    assert isinstance(outcomes[1], InvalidPacket) and decode_ms > 0 and compute_ms > 0
    expected = run_batch(model, [rows[0], rows[2]])[0]
    np.testing.assert_allclose(np.stack([outcomes[0], outcomes[2]]), expected, rtol=1e-6)


def test_pad_tokens_shapes_and_mask() -> None:
    rows = [np.ones((2, 3), np.float32), np.full((4, 3), 2, np.float32)]
    tokens, mask = pad_tokens(rows)
    assert tokens.shape == (2, 4, 3) and mask.shape == (2, 4) and tokens.dtype == np.float32
    np.testing.assert_array_equal(mask, [[True, True, False, False], [True] * 4])
    assert np.all(tokens[0, 2:] == 0) and np.all(tokens[1] == 2)


def test_length_buckets_group_by_power_of_two() -> None:
    assert length_buckets([1, 2, 3, 4, 5, 17, 9]) == [[0], [1], [2, 3], [4], [6], [5]]


@pytest.mark.parametrize("padding", ["pad", "bucket"])
def test_a_ragged_batch_matches_each_request_alone(tiny_registry, tiny_manifest, padding) -> None:
    (model,) = list(tiny_registry)
    rows = _rows(tiny_manifest, [1, 5, 2, tiny_manifest.num_tokens, 3])
    batched, compute_ms = run_batch(model, rows, padding)
    alone = np.concatenate([run_batch(model, [row])[0] for row in rows])
    assert batched.shape == (5, len(tiny_manifest.classes)) and compute_ms > 0
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", [{"max_batch_size": 0}, {"max_queue": 0}, {"instances": 0},
                                     {"max_queue_delay_ms": -1}, {"padding": "zip"}, {"max_batch_size": True}])
def test_bad_batch_config(setting) -> None:
    with pytest.raises(ValueError):
        BatchConfig(**setting)


def _blocked_model(tiny_registry):
    (model,) = list(tiny_registry)
    session = BlockingSession(model.engine.session)
    return with_session(model, session), session


def test_requests_queued_behind_a_busy_model_form_one_batch(tiny_registry, tiny_manifest) -> None:
    model, session = _blocked_model(tiny_registry)
    rows, packets = _packets(tiny_manifest, [2, 7, 3, 5, 4])

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = ModelBatcher(model, BatchConfig(max_batch_size=4), pool)
            batcher.start()
            session.block.set()
            first = batcher.submit(packets[0])
            await asyncio.get_running_loop().run_in_executor(None, session.entered.wait, 5)
            session.block.clear()
            rest = [batcher.submit(packet) for packet in packets[1:]]
            assert batcher.queue_depth == 4
            session.release.set()
            results = await asyncio.gather(first, *rest)
            await batcher.close()
            return results

    results = asyncio.run(scenario())
    assert session.batch_sizes == [1, 4]
    expected = np.concatenate([run_batch(model, [row])[0] for row in rows])
    np.testing.assert_allclose(np.stack([p for p, _, _ in results]), expected, rtol=1e-5, atol=1e-6)


def test_a_malformed_packet_is_refused_at_submit_and_the_batch_goes_on(tiny_registry, tiny_manifest) -> None:
    (model,) = list(tiny_registry)
    rows, packets = _packets(tiny_manifest, [3, 4])
    bad = type(packets[0])()
    bad.CopyFrom(packets[0])
    bad.positions[:] = list(bad.positions)[::-1]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = ModelBatcher(model, BatchConfig(max_batch_size=4), pool)
            batcher.start()
            with pytest.raises(InvalidPacket, match="strictly increasing"):
                batcher.submit(bad)  # refused before it is queued: nothing waits on it
            assert batcher.queue_depth == 0
            results = await asyncio.gather(*(batcher.submit(p) for p in packets))
            await batcher.close()
            return results

    results = asyncio.run(scenario())
    expected = np.concatenate([run_batch(model, [row])[0] for row in rows])
    np.testing.assert_allclose(np.stack([p for p, _, _ in results]), expected, rtol=1e-5, atol=1e-6)


def test_queue_delay_waits_for_the_batch_to_fill(tiny_registry, tiny_manifest) -> None:
    model, session = _blocked_model(tiny_registry)
    _, packets = _packets(tiny_manifest, [2, 3, 4])

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = ModelBatcher(model, BatchConfig(max_batch_size=3, max_queue_delay_ms=5000), pool)
            batcher.start()
            futures = []
            for packet in packets:  # arrive two loop turns apart: a zero-delay batcher would run them one by one
                futures.append(batcher.submit(packet))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            await asyncio.gather(*futures)
            await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert session.batch_sizes == [3]  # full batch dispatched at once, long before the 5 s delay


def test_expired_and_cancelled_requests_are_dropped_before_compute(tiny_registry, tiny_manifest) -> None:
    model, session = _blocked_model(tiny_registry)
    _, rows = _packets(tiny_manifest, [2, 3, 4, 5])

    async def scenario():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            batcher = ModelBatcher(model, BatchConfig(max_batch_size=8), pool)
            batcher.start()
            session.block.set()
            first = batcher.submit(rows[0])
            await loop.run_in_executor(None, session.entered.wait, 5)
            session.block.clear()
            expired = batcher.submit(rows[1], deadline=0.0)  # a perf_counter time long past
            cancelled = batcher.submit(rows[2])
            cancelled.cancel()
            alive = batcher.submit(rows[3])
            session.release.set()
            await asyncio.gather(first, alive)
            with pytest.raises(DeadlineExceeded, match="dropped before compute"):
                await expired
            await batcher.close()
            return batcher.dropped

    assert asyncio.run(scenario()) == 2
    assert session.batch_sizes == [1, 1]


def test_a_full_queue_is_overloaded_and_recovers(tiny_registry, tiny_manifest) -> None:
    model, session = _blocked_model(tiny_registry)
    _, rows = _packets(tiny_manifest, [2, 3, 4, 5])

    async def scenario():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            batcher = ModelBatcher(model, BatchConfig(max_batch_size=1, max_queue=2), pool)
            batcher.start()
            session.block.set()
            running = batcher.submit(rows[0])
            await loop.run_in_executor(None, session.entered.wait, 5)
            queued = [batcher.submit(rows[1]), batcher.submit(rows[2])]
            with pytest.raises(Overloaded, match="limit 2"):
                batcher.submit(rows[3])
            session.block.clear()
            session.release.set()
            await asyncio.gather(running, *queued)
            await batcher.submit(rows[3])
            await batcher.close()
            with pytest.raises(Overloaded, match="unloaded"):
                batcher.submit(rows[0])

    asyncio.run(scenario())


def test_a_stopped_executor_fails_requests_instead_of_hanging(tiny_registry, tiny_manifest) -> None:
    (model,) = list(tiny_registry)
    _rows_, packets = _packets(tiny_manifest, [3, 4])

    async def scenario():
        pool = ThreadPoolExecutor(1)
        pool.shutdown()
        batcher = ModelBatcher(model, BatchConfig(max_batch_size=4), pool)
        batcher.start()
        futures = [batcher.submit(p) for p in packets]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
        await asyncio.wait_for(batcher.close(), 5)
        return outcomes, batcher.in_flight

    outcomes, in_flight = asyncio.run(scenario())
    assert all(isinstance(o, Overloaded) and "stopping" in str(o) for o in outcomes)
    assert in_flight == 0
