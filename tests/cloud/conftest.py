"""Fixtures for the server role: the tiny model loaded, valid requests, a live server on port 0."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from splitinfer.cloud import ModelRegistry, SplitInferServer, create_server
from splitinfer.protos import CodecConfig, Manifest, encode_tokens, load_manifest, splitinfer_pb2_grpc
from splitinfer.protos import splitinfer_pb2 as pb

# The live test server accepts messages up to this size, so the size limit is cheap to exceed.
SERVER_MESSAGE_LIMIT = 256 * 1024
RPC_TIMEOUT_S = 10.0


def random_tokens(manifest: Manifest, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random tokens float32 (count, d) at sorted positions int64 (count,), CLS (0) first."""
    rng = np.random.default_rng(seed)
    patches = rng.choice(np.arange(1, manifest.num_tokens), size=count - 1, replace=False)
    positions = np.concatenate([[0], np.sort(patches)]).astype(np.int64)
    tokens = rng.standard_normal((count, manifest.dim)).astype(np.float32)
    return tokens, positions


def copy_model(src: Path, dst: Path, **manifest_changes: object) -> Path:
    """Copy a model folder and change top-level manifest fields (its manifest sha256 changes too)."""
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    data.update(manifest_changes)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dst


@pytest.fixture(scope="session")
def tiny_manifest(tiny_model_dir: Path) -> Manifest:
    return load_manifest(tiny_model_dir, need=("server",))


@pytest.fixture(scope="session")
def tiny_registry(tiny_model_dir: Path) -> ModelRegistry:
    return ModelRegistry.from_folders([tiny_model_dir])


@pytest.fixture(scope="session")
def make_request(tiny_manifest: Manifest) -> Callable[..., pb.InferRequest]:
    """Factory: a valid InferRequest for the tiny model; keyword arguments override its fields."""

    def make(count: int = 5, config: CodecConfig = CodecConfig("fp32", "none"), seed: int = 0,
             **fields: object) -> pb.InferRequest:
        tokens, positions = random_tokens(tiny_manifest, count, seed)
        request = pb.InferRequest(model=tiny_manifest.name, manifest_sha256=tiny_manifest.sha256,
                                  request_id=f"req-{seed}", packet=encode_tokens(tokens, positions, config))
        for name, value in fields.items():
            if isinstance(value, pb.TokenPacket):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)
        return request

    return make


@pytest.fixture(scope="module")
def live_server(tiny_registry: ModelRegistry) -> Iterator[SplitInferServer]:
    server, port = create_server(tiny_registry, port=0, max_workers=4, max_message_bytes=SERVER_MESSAGE_LIMIT)
    assert port > 0
    server.start()
    try:
        yield server
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def channel(live_server: SplitInferServer) -> Iterator[grpc.Channel]:
    # The client may send more than the server accepts, so the server's own limit is what is tested.
    options = [("grpc.max_send_message_length", 4 * SERVER_MESSAGE_LIMIT),
               ("grpc.max_receive_message_length", 4 * SERVER_MESSAGE_LIMIT)]
    with grpc.insecure_channel(live_server.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> splitinfer_pb2_grpc.SplitInferenceStub:
    return splitinfer_pb2_grpc.SplitInferenceStub(channel)
