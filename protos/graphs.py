"""The ONNX graphs' input and output names: one place, used by export, edge and cloud.

device.onnx
  image models: IMAGE float32 (B, C, H, W)
  text models:  INPUT_IDS int64 (B, T), ATTENTION_MASK int64 (B, T) (1 = real token)
  -> EXIT_LOGITS (B, K) or EXIT_EMBEDDING (B, D), TOKENS float32 (B, N, d) (CLS first),
     IMPORTANCE float32 (B, N - 1) (zero on padding, rows sum to 1),
     and for classifiers EXIT_CONFIDENCE float32 (B,): the exit policy's confidence in [0, 1] (the
     device answers alone when it is >= the manifest's exit threshold; see manifest.ExitSpec).
     Folders exported before it existed lack it: their policy is max softmax of EXIT_LOGITS.
  A view-consistency half also takes SECOND_VIEW bool () (:func:`device_feed` adds it): true runs
  the policy; false runs one view (whole-model baselines), EXIT_CONFIDENCE then being max softmax.
server.onnx
  TOKENS float32 (B, T, d) (CLS first), MASK bool (B, T) (True = real) -> LOGITS (B, K) or EMBEDDING (B, D)
"""
from __future__ import annotations

__all__ = ["IMAGE", "INPUT_IDS", "ATTENTION_MASK", "TOKENS", "IMPORTANCE", "MASK", "EXIT_LOGITS", "EXIT_EMBEDDING",
           "EXIT_CONFIDENCE", "SECOND_VIEW", "LOGITS", "EMBEDDING", "device_inputs", "device_outputs", "device_feed", "server_inputs", "server_output"]

IMAGE = "image"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKENS = "tokens"
IMPORTANCE = "importance"
MASK = "mask"
EXIT_LOGITS = "exit_logits"
EXIT_EMBEDDING = "exit_embedding"
EXIT_CONFIDENCE = "exit_confidence"
SECOND_VIEW = "second_view"
LOGITS = "logits"
EMBEDDING = "embedding"


def device_inputs(input_kind: str) -> tuple[str, ...]:
    if input_kind == "image":
        return (IMAGE,)
    if input_kind == "text":
        return (INPUT_IDS, ATTENTION_MASK)
    raise ValueError(f"input kind must be 'image' or 'text', got {input_kind!r}")


def device_outputs(task: str) -> tuple[str, ...]:
    if _task(task) == "classification":
        return (EXIT_LOGITS, TOKENS, IMPORTANCE, EXIT_CONFIDENCE)
    return (EXIT_EMBEDDING, TOKENS, IMPORTANCE)


def exit_output(task: str) -> str:
    return {"classification": EXIT_LOGITS, "embedding": EXIT_EMBEDDING}[_task(task)]


def device_feed(session, feed: dict, second_view: bool = True) -> dict:
    """``feed`` for an ONNX Runtime session of a device half, with SECOND_VIEW added when its graph
    takes it (view-consistency halves)."""
    if any(i.name == SECOND_VIEW for i in session.get_inputs()):
        import numpy as np

        return {**feed, SECOND_VIEW: np.array(second_view)}
    return feed


def server_inputs() -> tuple[str, str]:
    return (TOKENS, MASK)


def server_output(task: str) -> str:
    return {"classification": LOGITS, "embedding": EMBEDDING}[_task(task)]


def _task(task: str) -> str:
    if task not in ("classification", "embedding"):
        raise ValueError(f"task must be 'classification' or 'embedding', got {task!r}")
    return task
