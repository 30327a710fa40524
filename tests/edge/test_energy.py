from __future__ import annotations

import json

import pytest

from splitinfer.edge.energy import (LABEL_BANDS, PROFILE_DIR, DeviceEnergyMeter, EnergyEstimate, EnergyModel,
                                    device_profile, energy_label, link_profile, load_energy_file, load_profiles,
                                    median_mj)
from splitinfer.edge.runner import EdgeRunner

from .test_runner import FakeTransport


def test_every_profile_number_has_a_source():
    for kind in ("devices", "links", "servers"):
        raw = json.loads((PROFILE_DIR / f"{kind}.json").read_text())
        profiles = load_profiles(kind)
        assert set(profiles) == set(raw)
        for key, entry in raw.items():
            numbers = {k: v for k, v in entry.items() if k != "name"}
            assert numbers, key
            for name, value in numbers.items():
                assert isinstance(value["value"], (int, float)), (key, name)
                assert len(value["source"]) > 20, (key, name)
            assert set(profiles[key].sources) == set(numbers)
    assert set(load_profiles("devices")) >= {"pi4", "pi5", "laptop"}
    assert set(load_profiles("links")) >= {"wifi", "lte", "ethernet"}


def test_energy_arithmetic_matches_hand_computed_values():
    model = EnergyModel.named("pi4", "wifi", "xeon")
    # device: 2 ms of CPU at 0.925 W per busy core
    assert model.device_mj(2e-3) == pytest.approx(1.85)
    # radio: 1000 B up at 2265.36 nJ/B, 100 B down at 1096.08 nJ/B, 10 ms awake at 0.13286 W
    assert model.radio_mj(1000, 100, 0.010) == pytest.approx(2.26536 + 0.109608 + 1.3286)
    assert model.radio_mj(0, 0, 0.010) == 0.0
    # server: 1 ms at 7.5 W per busy core
    assert model.server_mj(1e-3) == pytest.approx(7.5)
    estimate = model.estimate(1.85, 1000, 100, 0.010, 1e-3)
    assert estimate.total_mj == pytest.approx(1.85 + 3.703568 + 7.5)
    assert estimate.method == "cpu_time"
    assert model.estimate(1.85).total_mj == pytest.approx(1.85)  # decided on the device: nothing else
    # LTE with its tail: 1060 mW for 11.576 s on top of the transfer
    lte = EnergyModel.named("pi4", "lte", include_tail=True)
    assert lte.radio_mj(1000, 0, 0.0) == pytest.approx(3.50712 + 1.06 * 11.576 * 1e3)
    with pytest.raises(ValueError, match="total_mj"):
        EnergyEstimate(1.0, 1.0, 1.0, 4.0, "cpu_time")


@pytest.mark.parametrize("ratio, label", [
    (0.0, "A"), (0.25, "A"), (0.2501, "B"), (0.40, "B"), (0.55, "C"), (0.70, "D"), (0.85, "E"),
    (0.8501, "F"), (1.0, "F"), (1.0001, "G"), (7.0, "G"),
])
def test_label_boundaries(ratio, label):
    assert energy_label(ratio) == label


def test_label_bands_are_ordered_and_reject_bad_ratios():
    edges = [upper for _, upper in LABEL_BANDS]
    assert edges == sorted(edges) and [name for name, _ in LABEL_BANDS] == list("ABCDEFG")
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError):
            energy_label(bad)


def test_meter_cpu_time_and_rapl(tmp_path):
    ticks = iter([1.000, 1.004])
    meter = DeviceEnergyMeter(device_profile("pi5"), rapl_path=None, cpu_clock=lambda: next(ticks))
    assert meter.method == "cpu_time"
    assert meter.mj_between(meter.read(), meter.read()) == pytest.approx(0.004 * 1.0 * 1e3)

    counter = tmp_path / "energy_uj"
    (tmp_path / "max_energy_range_uj").write_text("1000000\n")
    counter.write_text("999000\n")
    rapl = DeviceEnergyMeter(device_profile("laptop"), rapl_path=counter)
    assert rapl.method == "rapl"
    before = rapl.read()
    counter.write_text("2500\n")  # wrapped: 1000 uJ to the top, then 2500 uJ
    assert rapl.mj_between(before, rapl.read()) == pytest.approx(3.5)
    assert DeviceEnergyMeter(device_profile("pi4"), rapl_path=tmp_path / "missing").method == "cpu_time"

    calls = iter(range(100))
    steady = DeviceEnergyMeter(device_profile("pi4"), rapl_path=None, cpu_clock=lambda: next(calls) * 1e-3)
    assert median_mj(lambda: None, steady, repeats=5, warmup=0) == pytest.approx(0.925)


def test_custom_profile_files(tmp_path):
    device = {"name": "my board", "active_w_per_core": {"value": 2.0, "source": "measured with a USB meter, 2024"}}
    (tmp_path / "board.json").write_text(json.dumps(device))
    assert device_profile(tmp_path / "board.json").active_w_per_core == 2.0
    model = load_energy_file(_write(tmp_path / "custom.json", {"device": device}))
    assert model.device.name == "my board" and model.link == link_profile("wifi")
    unsourced = {"device": {"name": "x", "active_w_per_core": {"value": 1.0}}}
    with pytest.raises(ValueError, match="source"):
        load_energy_file(_write(tmp_path / "bad.json", unsourced))
    with pytest.raises(ValueError, match="unknown"):
        load_energy_file(_write(tmp_path / "typo.json", {"devise": device}))
    with pytest.raises(ValueError, match="unknown device profile"):
        device_profile("pi9")


def test_runner_attaches_energy(device_session, tiny_manifest, images):
    model = EnergyModel.named("pi4", "wifi")
    meter = DeviceEnergyMeter(model.device, rapl_path=None)
    local = EdgeRunner(device_session, None, tiny_manifest, energy=model, meter=meter).classify(images[0])
    assert local.energy.method == "cpu_time" and local.energy.radio_mj == 0 == local.energy.server_mj
    assert local.energy.total_mj == local.energy.device_mj >= 0
    runner = EdgeRunner(device_session, FakeTransport(num_classes=len(tiny_manifest.classes)), tiny_manifest,
                        exit_threshold=2.0, energy=model, meter=meter)
    result = runner.classify(images[1])
    assert result.decided_on == "server" and result.bytes_received > 0
    assert result.energy.radio_mj >= model.radio_mj(result.bytes_sent, result.bytes_received, 0.0) > 0
    assert result.to_dict()["energy"]["total_mj"] == pytest.approx(result.energy.total_mj)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path
