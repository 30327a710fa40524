import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from splitinfer.protos import errors

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stubs_import_under_package_namespace():
    from splitinfer.protos import splitinfer_pb2, splitinfer_pb2_grpc

    assert splitinfer_pb2.DESCRIPTOR.package == "splitinfer.v1"
    assert hasattr(splitinfer_pb2_grpc, "SplitInferenceStub")


@pytest.mark.parametrize("cls, code", [
    (errors.InvalidPacket, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ManifestMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ServerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_error_codes_map_both_ways(cls, code):
    assert errors.status_code_for(cls("x")) == code

    class FakeRpcError(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return "detail text"

    back = errors.from_rpc_error(FakeRpcError())
    assert type(back) is cls and "detail text" in str(back)


def test_unexpected_exceptions_are_internal_not_unknown():
    assert errors.status_code_for(KeyError("boom")) == grpc.StatusCode.INTERNAL
