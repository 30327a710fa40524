"""examples/k8s/: valid against the Kubernetes schemas (offline), consistent with itself and with splitinfer-serve."""
from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitinfer.cloud import SERVICE_NAME, create_server
from splitinfer.cloud.cli import build_parser
from splitinfer.protos import splitinfer_pb2_grpc
from splitinfer.protos import splitinfer_pb2 as pb

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[2] / "examples" / "k8s"
KUBERNETES_VERSION = "1.37.0"


def _documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_manifests_validate_against_the_kubernetes_schemas_offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = _documents()
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broken = _documents()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50052
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_manifests_agree_with_each_other_and_with_splitinfer_serve() -> None:
    docs = _documents()
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == "splitinfer-serve"
    args = build_parser().parse_args(container["args"][1:])  # every option exists and parses
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "health": args.health_port, "metrics": args.metrics_port}
    assert container["readinessProbe"]["grpc"] == {"port": args.health_port, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"]["port"] == args.health_port
    assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts) == set(volumes)
    assert str(args.repositories[0]) == mounts["models"] and "persistentVolumeClaim" in volumes["models"]
    assert str(args.tls_cert).startswith(mounts["tls"]) and str(args.tls_key).startswith(mounts["tls"])
    assert str(args.auth_token_file).startswith(mounts["auth"])
    assert "secret" in volumes["tls"] and "secret" in volumes["auth"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.grace_s


def test_the_health_port_answers_probes_in_plaintext_and_nothing_else(tiny_registry, certificates) -> None:
    from splitinfer.cloud import TlsConfig

    server, _port = create_server(tiny_registry, port=0, health_port=0, auth_tokens=("secret-token",),
                                  tls=TlsConfig(certificates.server_cert, certificates.server_key))
    server.start()
    try:
        assert server.health_port and server.health_port != server.port
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(pb.InferRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0).wait(10)
