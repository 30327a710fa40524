"""The server half run on this machine, behind the same Transport interface as a real server.

For an embedding model with no server (every input needs the server half), or to check a model
folder end to end without a network: ``LocalTransport(manifest)`` decodes the packet with the
server's own limits and runs ``server.onnx`` in ONNX Runtime here.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from splitinfer.protos import graphs
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import PacketLimits, decode_tokens
from splitinfer.protos.errors import ManifestError, ManifestMismatch, ModelNotFound
from splitinfer.protos.manifest import Manifest

from .session import SessionOptions

__all__ = ["LocalTransport"]


class LocalTransport:
    def __init__(self, manifest: Manifest, options: SessionOptions = SessionOptions()):
        manifest.verify(("server",))
        self.manifest = manifest
        try:
            self._session = ort.InferenceSession(str(manifest.server_path), sess_options=options.to_ort(),
                                                 providers=list(options.providers))
        except Exception as exc:
            raise ManifestError(f"{manifest.server_path}: ONNX Runtime cannot load the server half: {exc}") from exc
        self._output = graphs.server_output(manifest.task)
        self.limits = PacketLimits.for_manifest(manifest)

    def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        if request.model != self.manifest.name:
            raise ModelNotFound(f"model {request.model[:100]!r} is not {self.manifest.name!r}")
        if request.manifest_sha256 != self.manifest.sha256:
            raise ManifestMismatch("the request's manifest differs from the local model folder")
        tokens, _ = decode_tokens(request.packet, self.limits)
        out = self._session.run([self._output], {graphs.TOKENS: tokens[None],
                                                 graphs.MASK: np.ones((1, tokens.shape[0]), np.bool_)})[0][0]
        response = pb.InferResponse(request_id=request.request_id)
        if self.manifest.task == "embedding":
            response.embedding.extend(out.astype(np.float32).tolist())
            return response
        z = np.exp(out.astype(np.float64) - out.max())
        probs = z / z.sum()
        response.label = int(np.argmax(probs))
        response.probabilities.extend(probs.tolist())
        return response

    def close(self) -> None:
        pass
