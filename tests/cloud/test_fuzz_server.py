"""Fuzzing the live server: over 20,000 hostile requests, raw bytes and structured, against
``splitinfer-serve`` in its own process.

Every call has a deadline. Asserted: no UNKNOWN, no INTERNAL, no call past its deadline, the
process alive throughout, every call counted in ``splitinfer_requests_total``, no traceback in the
log and a bounded log per call, resident memory bounded, every valid request answered with the
same probabilities as the server half computed here, and a valid request answered correctly after.

hypothesis drives two generators: ``requests`` draws each hostile request field by field; for
volume, ``expand`` turns each drawn seed into 64 requests of the same kinds (so the whole run
fits in well under a minute on two cores).
"""
from __future__ import annotations

import random
import re
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.cloud import SERVICE_NAME, run_request
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.errors import MAX_DETAILS_CHARS

from .fuzz_requests import Case, Target, expand, requests, valid_request
from .serve_process import ServeProcess

INFER = f"/{SERVICE_NAME}/Infer"
CALL_DEADLINE_S = 10.0
BULK_SEEDS = 320  # x 64 requests
STRUCTURED_EXAMPLES = 100  # x 16 requests
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION}
RSS_GROWTH_LIMIT = 16 << 20  # measured: about 1 MiB over 23,000 requests
LOG_BYTES_PER_CALL = 400
METRICS = re.compile(r"^splitinfer-serve: metrics on (\S+)$")


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    valid_answered: int = 0

    @property
    def sent(self) -> int:
        return sum(self.codes.values())


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path, tmp_path_factory) -> ServeProcess:
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    server = ServeProcess(tiny_model_dir, log, args=("--metrics-port", "0", "--log-level", "INFO")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def target(tiny_manifest) -> Target:
    return Target(tiny_manifest.name, tiny_manifest.sha256, tiny_manifest.dim, tiny_manifest.num_tokens)


def _requests_counted(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("splitinfer_requests_total{"))


class Sender:
    """Sends cases concurrently through one channel and checks every answer."""

    def __init__(self, address: str, registry, num_classes: int) -> None:
        options = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.call = self.channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        self.registry = registry
        self.num_classes = num_classes
        self.tally = Tally()

    def send(self, cases: list[Case]) -> None:
        futures = [self.call.future(case.data, timeout=CALL_DEADLINE_S) for case in cases]
        problems = []
        for case, future in zip(cases, futures):
            self.tally.kinds[case.kind.split(":")[0]] += 1
            try:
                answer = pb.InferResponse.FromString(future.result())
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                self.tally.codes[code] += 1
                if code not in ALLOWED or len(details) > MAX_DETAILS_CHARS:
                    problems.append((case.kind, code, details, case.data[:80]))
                elif case.valid is not None:
                    problems.append((case.kind, code, details, "a valid request was refused"))
                continue
            self.tally.codes[grpc.StatusCode.OK] += 1
            problem = self._check_answer(case, answer)
            if problem:
                problems.append((case.kind, "OK", problem, case.data[:80]))
        assert not problems, f"{len(problems)} bad answers, first: {problems[:3]}"

    def _check_answer(self, case: Case, answer: pb.InferResponse) -> str | None:
        probs = np.asarray(answer.probabilities)
        if probs.shape != (self.num_classes,) or not np.isfinite(probs).all() or abs(probs.sum() - 1) > 1e-4:
            return f"malformed probabilities {probs[:4]}"
        if answer.label != int(np.argmax(probs)):
            return f"label {answer.label} is not the argmax"
        if case.valid is not None:
            expected = run_request(self.registry, case.valid)
            if answer.request_id != case.valid.request_id:
                return f"request_id {answer.request_id!r} for {case.valid.request_id!r}"
            if not np.allclose(probs, expected.probabilities, atol=1e-4):
                return "probabilities differ from the server half computed here"
            self.tally.valid_answered += 1
        return None

    def close(self) -> None:
        self.channel.close()


def test_fuzz_the_live_server(fuzz_server: ServeProcess, target: Target, tiny_registry, tiny_manifest) -> None:
    metrics_url = next(m.group(1) for line in fuzz_server.stdout_lines if (m := METRICS.match(line.strip())))
    sender = Sender(fuzz_server.address, tiny_registry, len(tiny_manifest.classes))
    hypothesis_settings = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

    @settings(max_examples=BULK_SEEDS, **hypothesis_settings)
    @given(st.integers(0, 2**63 - 1))
    def bulk(seed: int) -> None:
        sender.send(expand(seed, target))

    @settings(max_examples=STRUCTURED_EXAMPLES, **hypothesis_settings)
    @given(st.lists(requests(target), min_size=16, max_size=16))
    def structured(cases: list[Case]) -> None:
        sender.send(cases)

    try:
        for seed in range(16):  # warm-up: the server's pools and caches reach their working size
            sender.send(expand(10**9 + seed, target))
        rss_before = fuzz_server.rss_bytes()
        bulk()
        structured()
        rss_after = fuzz_server.rss_bytes()
        assert fuzz_server.alive, "the server died"
        final = valid_request(target, random.Random(1), "after-the-fuzz")
        sender.send([Case(final.SerializeToString(), "valid", final)])
    finally:
        sender.close()

    tally = sender.tally
    counted = _requests_counted(metrics_url)
    log_bytes = fuzz_server.log_path.stat().st_size
    log = fuzz_server.log_path.read_text(errors="replace")
    codes = {code.name: n for code, n in tally.codes.most_common()}
    print(f"\nfuzz: {tally.sent} requests {dict(tally.kinds.most_common())}: {codes}; "
          f"{tally.valid_answered} valid ones "
          f"answered correctly; server RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB; "
          f"log {log_bytes / tally.sent:.0f} B per request; {counted:.0f} counted in the metrics")
    assert tally.sent >= 20_000
    assert set(tally.codes) <= ALLOWED
    assert tally.valid_answered > 500 and tally.codes[grpc.StatusCode.INVALID_ARGUMENT] > 10_000
    assert counted == tally.sent, "requests missing from splitinfer_requests_total"
    assert "Traceback" not in log and "Unexpected" not in log
    assert log_bytes < LOG_BYTES_PER_CALL * tally.sent
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
