"""Fixtures for the server role: the tiny model loaded, valid requests, a live server on port 0, certificates."""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
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


def copy_model(src: Path, dst: Path, variant: str | None = None, **manifest_changes: object) -> Path:
    """Copy a model folder and change top-level manifest fields (its deployment hash and version
    change with them). variant: make the copy another export of the same model (a slightly
    different exit threshold, as a re-calibration gives)."""
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    data.update(manifest_changes)
    if variant is not None:
        data["exit"]["threshold"] = max(0.0, data["exit"]["threshold"] - 1e-6 * (1 + sum(map(ord, variant)) % 97))
    data.pop("version", None)
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


class BlockingSession:
    """Wraps an ORT session: ``run`` waits for ``release`` while ``block`` is set; counts batch sizes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.block = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []

    def run(self, outputs, feeds):
        self.batch_sizes.append(feeds["tokens"].shape[0])
        if self.block.is_set():
            self.entered.set()
            self.release.wait(RPC_TIMEOUT_S)
        return self.inner.run(outputs, feeds)


@pytest.fixture
def blocking_registry(tiny_registry: ModelRegistry) -> tuple[ModelRegistry, BlockingSession]:
    """The tiny model with a session that can be held mid-batch."""
    (model,) = list(tiny_registry)
    session = BlockingSession(model.session)
    return ModelRegistry([dataclasses.replace(model, session=session)]), session


@dataclasses.dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate for 127.0.0.1 / localhost, a client certificate, another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, issuer_name, issuer_key, key, *, ca: bool, sans=()):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        entries = [x509.IPAddress(ipaddress.ip_address(s)) if s[0].isdigit() else x509.DNSName(s) for s in sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Certificates:
    """A fresh CA, server and client certificates, made with ``cryptography`` for this test run."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("certs")
    paths = {}

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        paths[name] = path
        return path

    pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("splitinfer test CA", None, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", ca.subject, ca_key, server_key, ca=False, sans=("127.0.0.1", "localhost"))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("edge-device-1", ca.subject, ca_key, client_key, ca=False)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("another CA", None, None, other_key, ca=True)
    return Certificates(
        ca=write("ca.pem", pem(ca)), server_cert=write("server.pem", pem(server)),
        server_key=write("server.key", _key_pem(server_key)), client_cert=write("client.pem", pem(client)),
        client_key=write("client.key", _key_pem(client_key)), other_ca=write("other_ca.pem", pem(other)),
    )
