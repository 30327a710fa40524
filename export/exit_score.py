"""The exit policy's confidence, computed once in torch: device.onnx exports this code (graph output
``exit_confidence``) and the export's calibration simulates with it, so what is calibrated is what
the device runs.

- ``max_softmax``: the exit head's top probability.
- ``view_consistency``: the exit head also sees the image rolled by ``view_shift`` (rows, columns)
  pixels; the confidence is sqrt(p(c) * p'(c)), c the answer on the image itself,
  p and p' the two views' probabilities. An answer that does not survive a 2-pixel shift is the
  kind the server half fixes (benchmarks/exit_policy.py measures it beside the other policies).

:func:`exit_spec_for` resolves ``--exit-policy``: "auto" deploys view consistency on image
classifiers, max softmax on text classifiers (whose second view would need a text perturbation no
one has measured), and no exit on embedding models.
"""
from __future__ import annotations

import torch

from ..protos.manifest import ExitSpec
from .adapters.split import SplitModel

__all__ = ["EXIT_POLICIES", "DEFAULT_VIEW_SHIFT", "exit_spec_for", "device_pass"]

EXIT_POLICIES = ("auto", "max_softmax", "view_consistency")
# Up and left by 2 px: the calibration split's choice among 12 shifts in benchmarks/exit_policy.py.
DEFAULT_VIEW_SHIFT = (-2, -2)


def exit_spec_for(model: SplitModel, policy: str = "auto", view_shift: tuple[int, int] = DEFAULT_VIEW_SHIFT,
                  threshold: float = 1.0) -> ExitSpec:
    """The exit policy ``policy`` on this model, or ValueError when it cannot apply."""
    if policy not in EXIT_POLICIES:
        raise ValueError(f"exit policy must be one of {EXIT_POLICIES}, got {policy!r}")
    backbone = model.backbone
    if backbone.task == "embedding":
        if policy != "auto":
            raise ValueError(f"--exit-policy {policy} needs a classifier; an embedding model never exits on the device")
        return ExitSpec("none", threshold)
    if policy == "auto":
        policy = "view_consistency" if backbone.input_kind == "image" else "max_softmax"
    if policy == "view_consistency":
        if backbone.input_kind != "image":
            raise ValueError("--exit-policy view_consistency needs an image model (its second view is the image "
                             f"rolled by a few pixels); this is a {backbone.input_kind} model")
        return ExitSpec("view_consistency", threshold, tuple(int(v) for v in view_shift))
    return ExitSpec("max_softmax", threshold)


def device_pass(model: SplitModel, inputs: dict[str, torch.Tensor], exit: ExitSpec):
    """The device half on a batch -> (exit output, tokens, importance, key_weights, confidence (B,)
    or None for embedding models)."""
    if exit.score != "view_consistency":
        exit_out, tokens, importance, w = model.device_forward(inputs)
        if exit.score == "none":
            return exit_out, tokens, importance, w, None
        return exit_out, tokens, importance, w, exit_out.softmax(-1).amax(-1)
    (name, image), = inputs.items()
    exit_out, tokens, importance, w = model.device_forward(inputs)
    # The second view is its own branch of the graph (not a batch of two), so a whole-model run that
    # asks ONNX Runtime only for tokens never computes it.
    view = model.exit_only({name: torch.roll(image, shifts=exit.view_shift, dims=(2, 3))})
    logp, logp_view = exit_out.log_softmax(-1), view.log_softmax(-1)
    answer = logp.argmax(-1, keepdim=True)
    confidence = torch.exp(0.5 * (logp.gather(-1, answer) + logp_view.gather(-1, answer))).squeeze(-1)
    return exit_out, tokens, importance, w, confidence
