"""The ONNX graphs' input and output names: one place, used by export, edge and cloud.

device.onnx
  image models: IMAGE float32 (B, C, H, W)
  text models:  INPUT_IDS int64 (B, T), ATTENTION_MASK int64 (B, T) (1 = real token)
  -> EXIT_LOGITS (B, K) or EXIT_EMBEDDING (B, D), TOKENS float32 (B, N, d) (CLS first),
     IMPORTANCE float32 (B, N - 1) (zero on padding, rows sum to 1)
server.onnx
  TOKENS float32 (B, T, d) (CLS first), MASK bool (B, T) (True = real) -> LOGITS (B, K) or EMBEDDING (B, D)
"""
from __future__ import annotations

__all__ = ["IMAGE", "INPUT_IDS", "ATTENTION_MASK", "TOKENS", "IMPORTANCE", "MASK", "EXIT_LOGITS", "EXIT_EMBEDDING",
           "LOGITS", "EMBEDDING", "device_inputs", "device_outputs", "server_inputs", "server_output"]

IMAGE = "image"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKENS = "tokens"
IMPORTANCE = "importance"
MASK = "mask"
EXIT_LOGITS = "exit_logits"
EXIT_EMBEDDING = "exit_embedding"
LOGITS = "logits"
EMBEDDING = "embedding"


def device_inputs(input_kind: str) -> tuple[str, ...]:
    if input_kind == "image":
        return (IMAGE,)
    if input_kind == "text":
        return (INPUT_IDS, ATTENTION_MASK)
    raise ValueError(f"input kind must be 'image' or 'text', got {input_kind!r}")


def device_outputs(task: str) -> tuple[str, str, str]:
    return (exit_output(task), TOKENS, IMPORTANCE)


def exit_output(task: str) -> str:
    return {"classification": EXIT_LOGITS, "embedding": EXIT_EMBEDDING}[_task(task)]


def server_inputs() -> tuple[str, str]:
    return (TOKENS, MASK)


def server_output(task: str) -> str:
    return {"classification": LOGITS, "embedding": EMBEDDING}[_task(task)]


def _task(task: str) -> str:
    if task not in ("classification", "embedding"):
        raise ValueError(f"task must be 'classification' or 'embedding', got {task!r}")
    return task
