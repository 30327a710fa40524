"""The server role: model registry, request handling, gRPC server and the ``splitinfer-serve`` CLI.

Never imports torch: the server half is an ONNX graph run by ONNX Runtime.
"""
from .registry import LoadedModel, ModelRegistry, RuntimeConfig, load_model
from .server import SERVICE_NAME, ServerConfig, SplitInferenceServicer, SplitInferServer, create_server, serve
from .service import MAX_REQUEST_ID_CHARS, ModelLookup, run_request, softmax, validate_request

__all__ = [
    "LoadedModel", "ModelRegistry", "RuntimeConfig", "load_model",
    "SERVICE_NAME", "ServerConfig", "SplitInferenceServicer", "SplitInferServer", "create_server", "serve",
    "MAX_REQUEST_ID_CHARS", "ModelLookup", "run_request", "softmax", "validate_request",
]
