"""Exit policies: curves and the oracle, post-hoc scores, temperature, the deferral head (learns a
planted signal, exports to ONNX with the same numbers), and collect() against simulate_configs."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from splitinfer.export.exit_policy import (BREAK, FIX, NEUTRAL, DeferralHead, HeadConfig, OffloadSetting,  # noqa: E402
                                           Outcomes, collect, fit_temperature, gain_at_rates, offload_at_accuracy,
                                           offload_curve, oracle_scores, outcome_classes, post_hoc_scores,
                                           train_deferral_head)


def test_offload_curve_by_hand():
    score = np.array([0.9, 0.1, 0.5, 0.7])  # offload order: 0, 3, 2, 1
    exit_ok = np.array([False, True, True, False])
    server_ok = np.array([True, True, False, True])
    rate, acc = offload_curve(score, exit_ok, server_ok)
    np.testing.assert_allclose(rate, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [0.5, 0.75, 1.0, 0.75, 0.75])
    assert offload_at_accuracy(rate, acc, 1.0) == 0.5
    assert offload_at_accuracy(rate, acc, 0.7) == 0.25
    assert offload_at_accuracy(rate, acc, 0.5) == 0.0
    assert np.isnan(offload_at_accuracy(rate, acc, 1.01))
    # weights: input 0 counted twice (a bootstrap resample)
    rate_w, acc_w = offload_curve(score, exit_ok, server_ok, np.array([2, 1, 1, 1]))
    np.testing.assert_allclose(rate_w[:2], [0, 0.4])
    np.testing.assert_allclose(acc_w[:2], [0.4, 0.8])
    with pytest.raises(ValueError):
        offload_curve(score, exit_ok, server_ok, np.zeros(4))


def test_the_oracle_beats_every_ranking():
    rng = np.random.default_rng(0)
    exit_ok, server_ok = rng.random(500) < 0.9, rng.random(500) < 0.95
    _, oracle = offload_curve(oracle_scores(exit_ok, server_ok), exit_ok, server_ok)
    for _ in range(20):
        _, acc = offload_curve(rng.random(500), exit_ok, server_ok)
        assert (oracle >= acc - 1e-12).all()
    assert oracle.max() == pytest.approx((exit_ok | server_ok).mean())


def test_post_hoc_scores_and_outcome_classes():
    logits = np.array([[4.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    s = post_hoc_scores(logits, temperature=2.0)
    for name in ("max_softmax", "margin", "entropy", "temperature"):
        assert s[name].shape == (3,)
        assert s[name][0] < s[name][1] < s[name][2] or name == "margin"  # the confident row is offloaded last
    assert s["margin"][2] == pytest.approx(0.0) and s["margin"][0] < s["margin"][1]
    np.testing.assert_array_equal(outcome_classes(np.array([0, 1, 2, 2]), np.array([1, 1, 2, 0]), np.array([0, 1, 0, 0])),
                                  [BREAK, NEUTRAL, NEUTRAL, FIX])


def test_fit_temperature_recovers_a_planted_one():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4000, 5)) * 2.0
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(3.0 * z, labels) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError):
        fit_temperature(z[:, 0], labels)


def planted(n: int, seed: int, dim: int = 8, classes: int = 4) -> Outcomes:
    """Exit errors show in the exit logits (a low margin), but whether the server fixes one shows
    only in the hidden states (the CLS token's first coordinate)."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.normal(size=(n, 5, dim)).astype(np.float32))
    labels = rng.integers(0, classes, n)
    exit_wrong = rng.random(n) < 0.3
    exit_pred = np.where(exit_wrong, (labels + 1) % classes, labels)
    fixable = tokens[:, 0, 0].numpy() > 0.5
    margin = np.where(exit_wrong, 0.3, 3.0)[:, None]
    logits = torch.from_numpy((np.eye(classes)[exit_pred] * margin + 0.2 * rng.normal(size=(n, classes))).astype(np.float32))
    server_pred = np.where(exit_wrong & fixable, labels, exit_pred)
    features = DeferralHead.features(tokens, logits).numpy()
    return Outcomes(labels, logits.numpy(), server_pred, labels.copy(), features)


def test_deferral_head_learns_what_the_logits_do_not_show():
    torch.set_num_threads(1)  # a tiny MLP: threads only add overhead
    train, valid, test = planted(4000, 0), planted(1000, 1), planted(2000, 2)
    cfg = HeadConfig(hidden=32, epochs=15, batch_size=256, lr=5e-3)
    head, info = train_deferral_head(train, valid, 8, 4, cfg)
    logits_only, _ = train_deferral_head(train, valid, 8, 4, HeadConfig(hidden=32, epochs=15, batch_size=256, lr=5e-3, tokens=False))
    gain = (test.server_pred == test.labels).astype(float) - (test.exit_pred == test.labels)
    with torch.no_grad():
        learned = head.score_from_features(torch.from_numpy(test.features)).numpy()
        blind = logits_only.score_from_features(torch.from_numpy(test.features)).numpy()
    rates = np.linspace(0.02, 0.08, 4)  # about 9% of the inputs are fixable
    oracle = gain_at_rates(gain, gain, rates)
    assert gain_at_rates(learned, gain, rates) > 0.8 * oracle
    assert gain_at_rates(blind, gain, rates) < 0.6 * oracle
    max_softmax = post_hoc_scores(test.exit_logits)["max_softmax"]
    assert gain_at_rates(max_softmax, gain, rates) < 0.6 * oracle
    assert len(info["history"]) == 15 and info["best_valid_gain"] > 0


def test_deferral_head_on_tokens_matches_features_and_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    head = DeferralHead(16, 10, hidden=8).eval()
    tokens, logits = torch.randn(3, 9, 16), torch.randn(3, 10)
    score = head(tokens, logits)
    assert score.shape == (3,) and (score.abs() <= 1).all()
    assert DeferralHead.features(tokens, logits).shape == (3, DeferralHead.feature_count(16, 10))
    blind = DeferralHead(16, 10, hidden=8, tokens=False).eval()
    assert torch.equal(blind(tokens, logits), blind(torch.randn(3, 9, 16), logits))  # reads logits only
    path = tmp_path / "deferral.onnx"
    torch.onnx.export(head, (tokens, logits), str(path), input_names=["tokens", "exit_logits"], output_names=["deferral"],
                      dynamic_axes={"tokens": {0: "batch"}, "exit_logits": {0: "batch"}, "deferral": {0: "batch"}},
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t2, l2 = torch.randn(5, 9, 16), torch.randn(5, 10)
    (out,) = session.run(None, {"tokens": t2.numpy(), "exit_logits": l2.numpy()})
    np.testing.assert_allclose(out, head(t2, l2).detach().numpy(), atol=1e-5)


def test_collect_matches_simulate_configs():
    """The server's answer on what the edge sends equals the operating-point sweep's, through the
    built-in ViT's adapter."""
    from splitinfer.export.adapters.split import SplitModel
    from splitinfer.export.adapters.vit import BuiltinViT
    from splitinfer.export.datasets import Dataset
    from splitinfer.export.model import SplitViT, ViTConfig
    from splitinfer.export.operating_points import SweepSpace, simulate_configs
    from splitinfer.export.preprocess import normalize

    torch.manual_seed(0)
    model = SplitViT(ViTConfig(dim=32, depth=3, heads=2, split=1)).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 64, 64), dtype=np.uint8)
    labels = rng.integers(0, 10, 12)
    got = collect(model, images, labels, OffloadSetting(0.8, 8, "int4"), batch_size=5)
    space = SweepSpace(encodings=("int4",), selections=((0.8, 8),), thresholds=(0.5,))
    sim = simulate_configs(SplitModel(BuiltinViT(model), 1).eval(), Dataset("t", {"image": normalize(images)}, labels),
                           space, {"model": "m", "manifest_sha256": "0" * 64, "request_id": "0" * 32})
    np.testing.assert_array_equal(got.server_pred == labels, sim.configs[(None, "int4", 0.8, 8)][0] > 0.5)
    np.testing.assert_array_equal(got.full_pred, sim.full_pred)
    np.testing.assert_array_equal(got.exit_pred, sim.exit_pred)
    assert got.features.shape == (12, DeferralHead.feature_count(32, 10))
    assert len(got.subset(np.arange(4))) == 4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        OffloadSetting(mass=0.0)
    with pytest.raises(ValueError):
        OffloadSetting(encoding="int3")
    with pytest.raises(ValueError):
        HeadConfig(epochs=0)
