"""The server role: model registry and repository, dynamic batching, gRPC server, metrics, ``splitinfer-serve``.

Never imports torch: the server half is an ONNX graph run by ONNX Runtime.
"""
from .batcher import BatchConfig, ModelBatcher, decode_and_run, length_buckets, pad_tokens, run_batch
from .engine import OrtEngine, ProviderUnavailable, ServerHalf
from .registry import LoadedModel, ModelRegistry, RuntimeConfig, load_model
from .repository import ModelSource, find_model_folders
from .security import BearerTokenInterceptor, TlsConfig, TlsFileError, read_tokens
from .server import (
    SERVICE_NAME,
    AsyncSplitInferServer,
    ServerConfig,
    SplitInferenceServicer,
    SplitInferServer,
    create_server,
    serve,
)
from .service import (
    MAX_REQUEST_ID_CHARS,
    ModelLookup,
    build_response,
    decode_request,
    route_request,
    run_request,
    softmax,
    validate_request,
)

__all__ = [
    "BatchConfig", "ModelBatcher", "decode_and_run", "length_buckets", "pad_tokens", "run_batch",
    "OrtEngine", "ProviderUnavailable", "ServerHalf",
    "LoadedModel", "ModelRegistry", "RuntimeConfig", "load_model",
    "ModelSource", "find_model_folders",
    "BearerTokenInterceptor", "TlsConfig", "TlsFileError", "read_tokens",
    "SERVICE_NAME", "AsyncSplitInferServer", "ServerConfig", "SplitInferenceServicer", "SplitInferServer",
    "create_server", "serve",
    "MAX_REQUEST_ID_CHARS", "ModelLookup", "build_response", "decode_request", "route_request", "run_request", "softmax",
    "validate_request",
]
