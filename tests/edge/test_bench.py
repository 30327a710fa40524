from __future__ import annotations

import json

from splitinfer.edge.bench import BenchSetting, bench_settings, run_bench
from splitinfer.edge.cli import main

from .test_session import _float_only
from splitinfer.protos.manifest import load_manifest


def test_settings_grid_starts_with_the_chosen_one():
    chosen = BenchSetting("float", 1, False)
    grid = bench_settings(chosen, ("float", "int8"), cores=2)
    assert grid[0] == chosen and len(grid) == len(set(grid)) == 8
    assert {s.threads for s in grid} == {1, 2} and {s.spin for s in grid} == {False, True}
    assert len(bench_settings(BenchSetting("float", 4, True), ("float",), cores=1)) == 4  # threads {1, 4}


def test_run_bench_rows(tiny_model_dir):
    manifest = load_manifest(tiny_model_dir, need=("device",))
    rows = run_bench(manifest, [BenchSetting("float", 1, False), BenchSetting("float", 1, True)], n=8, rounds=2,
                     warmup=1, settle_s=0.0)
    assert [r.chosen for r in rows] == [True, False]
    for r in rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms and r.cpu_ms_per_inference > 0


def test_bench_subcommand_json(tiny_int8_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_int8_model_dir), "--n", "8", "--device-half", "float", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    halves = {row["setting"]["half"] for row in report["rows"]}
    assert halves == {"float", "int8"} and report["device_half_choice"] == "float"
    assert report["rows"][0]["chosen"] and report["rows"][0]["setting"] == {"half": "float", "threads": 1, "spin": False}


def test_bench_subcommand_table_and_errors(tiny_model_dir, tmp_path, capsys):
    tiny_model_dir = _float_only(tiny_model_dir, tmp_path / "float-only")
    assert main(["bench", "--model", str(tiny_model_dir), "--n", "8", "--threads", "2", "--spin", "--only-chosen"]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "float  threads 2  spin on" in out and "<- chosen" in out
    assert main(["bench", "--model", str(tmp_path / "nowhere"), "--n", "8"]) == 2
    assert main(["bench", "--model", str(tiny_model_dir), "--device-half", "int8", "--n", "8"]) == 2
    assert "--quantize int8" in capsys.readouterr().err


def test_classify_with_each_device_half(tiny_int8_model_dir, png_folder, capsys):
    for half in ("float", "int8", "auto"):
        assert main(["classify", "--model", str(tiny_int8_model_dir), "--device-half", half, str(png_folder)]) == 0
        assert "3 answered" in capsys.readouterr().out
