"""The text path on the device: tokenizer, device half, token selection, offload. No torch.

For one text::

    tokenizer.json (``tokenizers``) -> input_ids, attention_mask int64 (1, T)
      -> device.onnx -> exit output, tokens (1, T, d), importance (1, T - 1)
      classification and confident                      -> the exit head's answer   [decided_on="device"]
      else keep CLS + round(keep_ratio * real tokens) by importance -> encode (protos codec)
           -> transport (classification) or a local server half (any task)         [decided_on="server"]
      the offload fails in any way -> the exit head's answer, error recorded          [decided_on="degraded"]

Embedding models answer a vector (``TextResult.embedding``), over the wire in
``InferResponse.embedding``, or from a :class:`LocalServerHalf` (``server.onnx`` run here).
Needs ``tokenizers`` (the ``[text]`` extra), numpy and onnxruntime.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Protocol

import numpy as np
import onnxruntime as ort

from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import CodecConfig, PacketLimits, decode_tokens, encode_tokens
from splitinfer.protos.errors import ManifestError, ServerInternalError
from splitinfer.protos.manifest import Manifest, sha256_file

from .session import SessionOptions

__all__ = ["TextTokenizer", "TextDeviceSession", "LocalServerHalf", "TextResult", "TextRunner",
           "select_text_tokens", "is_text_manifest"]

logger = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask")


def is_text_manifest(manifest: Manifest) -> bool:
    return manifest.data.get("input", {}).get("kind") == "text"


class TextTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) -> int64 ids and attention mask, numpy."""

    def __init__(self, path: str | PathLike, max_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("the text path needs the tokenizers package: pip install 'splitinfer[text]'") from exc
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "TextTokenizer":
        spec = manifest.data.get("input", {})
        entry = manifest.data.get("files", {}).get("tokenizer", {})
        path = manifest.folder / entry.get("path", spec.get("tokenizer", "tokenizer.json"))
        if not path.is_file():
            raise ManifestError(f"{manifest.folder}: tokenizer {path.name} not found")
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{manifest.folder}: {path.name} does not match the sha256 in manifest.json")
        return cls(path, int(spec.get("max_length", manifest.num_tokens)))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> input_ids int64 (B, T), attention_mask int64 (B, T); padded to the longest, T <= max_length."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        encodings = self._tok.encode_batch(list(texts))
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        return ids, mask


def select_text_tokens(importance: np.ndarray, num_real: int, keep_ratio: float, min_tokens: int = 1) -> np.ndarray:
    """Positions to send, ascending, CLS (0) first.

    importance: float (T - 1,) over the non-CLS positions (padding scores are ignored). num_real:
    real tokens including CLS. Keeps k = max(min_tokens, round(keep_ratio * (num_real - 1))) of the
    real non-CLS tokens (at most all of them), ties towards the lower index. Returns int64 (1 + k,).
    Mirrors ``splitinfer.export.adapters.split.keep_counts`` and ``top_k_token_mask``.
    """
    importance = np.asarray(importance)
    if importance.ndim != 1:
        raise ValueError(f"importance must be 1-D, got shape {importance.shape}")
    if not 1 <= num_real <= importance.size + 1:
        raise ValueError(f"num_real must be in [1, {importance.size + 1}], got {num_real}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    real = num_real - 1
    if real == 0:
        return np.zeros(1, dtype=np.int64)
    k = min(max(min_tokens, int(np.round(np.float32(keep_ratio) * np.float32(real)))), real)
    order = np.argsort(-importance[:real], kind="stable")
    return np.concatenate([[0], 1 + np.sort(order[:k])]).astype(np.int64)


class TextDeviceSession:
    """ORT session of a text ``device.onnx``: (input_ids, attention_mask) -> (exit, tokens, importance)."""

    def __init__(self, path: str | PathLike, options: SessionOptions = SessionOptions()):
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options.to_ort(),
                                                 providers=list(options.providers))
        except Exception as exc:
            raise ManifestError(f"{path}: ONNX Runtime cannot load the device half: {exc}") from exc
        names = {i.name for i in self._session.get_inputs()}
        if names != set(TEXT_INPUTS):
            raise ManifestError(f"{path}: not a text device half: inputs {sorted(names)}, need {list(TEXT_INPUTS)}")
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (B, T) each -> exit (B, K|D), tokens float32 (B, T, d), importance float32 (B, T - 1)."""
        return tuple(self._session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask}))


class LocalServerHalf:
    """``server.onnx`` in ORT on this machine; takes a TokenPacket, as the server would."""

    def __init__(self, manifest: Manifest, options: SessionOptions = SessionOptions()):
        self.manifest = manifest
        path = manifest.server_path
        if manifest.data["files"]["server"].get("sha256") and sha256_file(path) != manifest.data["files"]["server"]["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in manifest.json")
        self._session = ort.InferenceSession(str(path), sess_options=options.to_ort(), providers=list(options.providers))
        self.limits = PacketLimits.for_manifest(manifest)

    def run_packet(self, packet: pb.TokenPacket) -> np.ndarray:
        """TokenPacket -> the server half's output float32 (K|D,)."""
        tokens, _ = decode_tokens(packet, self.limits)
        mask = np.ones((1, tokens.shape[0]), dtype=np.bool_)
        return self._session.run(None, {"tokens": tokens[None], "mask": mask})[0][0]


class Transport(Protocol):
    def infer(self, request: pb.InferRequest) -> pb.InferResponse: ...


@dataclass(frozen=True)
class TextResult:
    """One text's answer. task "classification": label, class_name, confidence, probabilities;
    "embedding": embedding (D,). tokens_total: real tokens (CLS, SEP included); tokens_sent: in the
    packet (0 when nothing was sent)."""

    text: str
    task: str
    decided_on: str
    label: int | None = None
    class_name: str | None = None
    confidence: float | None = None
    probabilities: tuple[float, ...] | None = None
    embedding: tuple[float, ...] | None = None
    tokens_total: int = 0
    tokens_sent: int = 0
    bytes_sent: int = 0
    latency_ms: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


class TextRunner:
    """Answers texts with a text model folder's device half, offloading through ``transport``
    (over the wire, any task) or ``server`` (a :class:`LocalServerHalf`, any task).

    keep_ratio: share of real tokens sent (default: the manifest's ``selection.keep_ratio``).
    """

    def __init__(self, session: TextDeviceSession, tokenizer: TextTokenizer, manifest: Manifest,
                 transport: Transport | None = None, server: LocalServerHalf | None = None,
                 codec: CodecConfig | None = None, keep_ratio: float | None = None,
                 exit_threshold: float | None = None):
        if not is_text_manifest(manifest):
            raise ManifestError(f"{manifest.folder}: not a text model (input.kind is not 'text')")
        self.task = manifest.data.get("task", "classification")
        self.session, self.tokenizer, self.manifest = session, tokenizer, manifest
        self.transport, self.server = transport, server
        self.codec = codec or CodecConfig(encoding=manifest.encoding, compression=manifest.compression)
        sel = manifest.data.get("selection", {})
        self.keep_ratio = float(sel.get("keep_ratio", 1.0) if keep_ratio is None else keep_ratio)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        self.min_tokens = int(sel.get("min_tokens", 1))
        self.exit_threshold = manifest.exit_threshold if exit_threshold is None else float(exit_threshold)

    @classmethod
    def from_folder(cls, folder: str | PathLike, server: bool = False, **kwargs) -> "TextRunner":
        from splitinfer.protos.manifest import load_manifest

        manifest = load_manifest(folder, need=("device", "server") if server else ("device",))
        return cls(TextDeviceSession(manifest.device_path), TextTokenizer.from_manifest(manifest), manifest,
                   server=LocalServerHalf(manifest) if server else None, **kwargs)

    def device(self, text: str):
        """text -> (exit output (K|D,), tokens (T, d), importance (T - 1,), real token count)."""
        ids, mask = self.tokenizer.encode([text])
        exit_out, tokens, importance = self.session.run(ids, mask)
        return exit_out[0], tokens[0], importance[0], int(mask.sum())

    def run(self, text: str) -> TextResult:
        start = time.perf_counter()
        exit_out, tokens, importance, num_real = self.device(text)
        local = self._answer(exit_out)
        confident = self.task == "classification" and local["confidence"] >= self.exit_threshold
        if confident or (self.transport is None and self.server is None):
            return self._result(text, "device", local, num_real, start)
        positions = select_text_tokens(importance, num_real, self.keep_ratio, self.min_tokens)
        packet = encode_tokens(tokens[positions], positions, self.codec)
        sent = {"tokens_sent": int(positions.size)}
        try:
            if self.server is not None:
                answer = self._answer(self.server.run_packet(packet))
                sent["bytes_sent"] = 0
            else:
                request = pb.InferRequest(model=self.manifest.name, manifest_sha256=self.manifest.sha256,
                                          request_id=uuid.uuid4().hex, packet=packet)
                sent["bytes_sent"] = request.ByteSize()
                response = self.transport.infer(request)
                answer = self._remote_answer(response, len(exit_out))
        except Exception as exc:  # the edge always answers
            logger.info("text offload degraded to the device answer: %s", exc)
            return self._result(text, "degraded", local, num_real, start, error=f"{type(exc).__name__}: {exc}", **sent)
        return self._result(text, "server", answer, num_real, start, **sent)

    def _remote_answer(self, response: pb.InferResponse, width: int) -> dict:
        """The server's answer -> the same dict as :meth:`_answer`; ServerInternalError if malformed.
        width: the device's own answer width (classes, or the embedding size)."""
        if self.task == "embedding":
            emb = np.asarray(response.embedding, dtype=np.float32)
            if emb.shape != (width,) or not np.all(np.isfinite(emb)):
                raise ServerInternalError(f"response has an embedding of {emb.size} values, expected {width} finite")
            return {"embedding": tuple(float(v) for v in emb)}
        probs = np.asarray(response.probabilities, dtype=np.float64)
        if probs.shape != (len(self.manifest.classes),) or not np.all(np.isfinite(probs)):
            raise ServerInternalError(f"response has {probs.size} probabilities, expected {len(self.manifest.classes)}")
        return {"label": int(np.argmax(probs)), "confidence": float(probs.max()),
                "probabilities": tuple(float(p) for p in probs)}

    def _answer(self, out: np.ndarray) -> dict:
        if self.task == "embedding":
            return {"embedding": tuple(float(v) for v in np.asarray(out, dtype=np.float32))}
        probs = _softmax(out)
        return {"label": int(np.argmax(probs)), "confidence": float(probs.max()),
                "probabilities": tuple(float(p) for p in probs)}

    def _result(self, text, decided_on, answer, num_real, start, **fields) -> TextResult:
        if "label" in answer and self.manifest.classes:
            answer = {**answer, "class_name": self.manifest.classes[answer["label"]]}
        return TextResult(text=text, task=self.task, decided_on=decided_on, tokens_total=num_real,
                          latency_ms=(time.perf_counter() - start) * 1e3, **answer, **fields)


def main(argv: list[str] | None = None) -> int:
    """``splitinfer-edge text --model DIR [--server HOST:PORT | --local-server] FILE...``: one input per
    line of each file ("-" reads stdin); one JSON object per input on stdout."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="splitinfer-edge text", description=main.__doc__)
    p.add_argument("--model", required=True, help="text model folder (manifest.json, device.onnx, tokenizer.json)")
    p.add_argument("--server", metavar="HOST:PORT", help="offload over gRPC (a classifier's unconfident inputs; every input of an embedding model)")
    p.add_argument("--local-server", action="store_true", help="run server.onnx here (any task)")
    p.add_argument("--keep-ratio", type=float, default=None, help="share of tokens sent (default: the manifest's)")
    p.add_argument("--timeout-ms", type=float, default=1000.0)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    transport = None
    try:
        runner = TextRunner.from_folder(args.model, server=args.local_server, keep_ratio=args.keep_ratio)
        if args.server:
            from .transport import GrpcTransport

            transport = GrpcTransport(args.server, timeout_s=args.timeout_ms / 1e3)
            runner = TextRunner(runner.session, runner.tokenizer, runner.manifest, transport=transport,
                                keep_ratio=args.keep_ratio)
    except (ManifestError, ValueError, OSError, ImportError) as exc:
        print(f"splitinfer-edge text: error: cannot load model from {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        for name in args.files:
            lines = sys.stdin.read().splitlines() if name == "-" else open(name, encoding="utf-8").read().splitlines()
            for line in (t.strip() for t in lines):
                if line:
                    print(json.dumps(runner.run(line).to_dict()))
    except OSError as exc:
        print(f"splitinfer-edge text: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if transport is not None:
            transport.close()
    return 0
