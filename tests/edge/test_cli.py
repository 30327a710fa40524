from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from splitinfer.edge.cli import main


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitinfer.edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_folder_without_server(tiny_model_dir, png_folder):
    proc = run_cli("classify", "--model", tiny_model_dir, png_folder)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    per_file = [line for line in lines if line.startswith(str(png_folder))]
    assert [line.split()[0] for line in per_file] == [str(png_folder / f"img_{i}.png") for i in range(3)]
    assert all("decided_on=device" in line and "bytes=0" in line for line in per_file)
    summary = "\n".join(lines[len(per_file):])
    assert "3 answered" in summary and "device 3 (100.0%)" in summary and "p50" in summary
    assert "Traceback" not in proc.stderr


def test_json_lines(tiny_model_dir, png_folder):
    proc = run_cli("classify", "--model", tiny_model_dir, "--json", png_folder / "img_1.png", png_folder)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 4
    assert records[0]["input"].endswith("img_1.png")
    for rec in records:
        assert rec["decided_on"] == "device" and rec["bytes_sent"] == 0
        assert {"class_name", "confidence", "latency_ms", "label"} <= set(rec)
    assert "4 answered" in proc.stderr


def test_bad_model_exits_2_without_traceback(tmp_path, png_folder):
    proc = run_cli("classify", "--model", tmp_path / "nowhere", png_folder)
    assert proc.returncode == 2
    assert "cannot use the model" in proc.stderr and "Traceback" not in proc.stderr


def test_unreadable_file_reported_others_processed(tiny_model_dir, png_folder, capsys):
    (png_folder / "broken.png").write_text("not an image")
    code = main(["classify", "--model", str(tiny_model_dir), str(png_folder), str(png_folder / "missing.png")])
    out = capsys.readouterr().out
    assert code == 1
    assert "broken.png  error=" in out and "missing.png  error=" in out
    assert out.count("decided_on=device") == 3
    assert "3 answered, 2 failed" in out


def test_server_down_degrades_and_still_answers(tiny_model_dir, png_folder, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["classify", "--model", str(tiny_model_dir), "--server", f"127.0.0.1:{port}", "--timeout-ms", "300",
                 "--threshold", "2", "--json", str(png_folder)])
    captured = capsys.readouterr()
    assert code == 0
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 3
    assert all(r["decided_on"] == "degraded" and r["error"] and r["bytes_sent"] > 0 for r in records)
    assert "degraded 3 (100.0%)" in captured.err and "mean per request" in captured.err


def test_resized_input_and_bad_arguments(tiny_model_dir, tmp_path, capsys):
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "small.png")
    assert main(["classify", "--model", str(tiny_model_dir), str(tmp_path / "small.png")]) == 0
    assert "decided_on=device" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["classify", "--model", str(tiny_model_dir), str(empty)]) == 1
    assert "no .png/" in capsys.readouterr().out
    for bad in (["--threshold", "-1"], ["--timeout-ms", "0"], ["--mass", "1.5"]):
        try:
            main(["classify", "--model", str(tiny_model_dir), *bad, str(tmp_path)])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{bad} accepted")


@pytest.mark.parametrize("bad", [["--audit-rate", "1.5"], ["--audit-rate", "-0.1"], ["--audit-alpha", "0"],
                                 ["--audit-disagreement", "1"], ["--horizon-h", "-1"], ["--max-battery-percent", "0"],
                                 ["--max-battery-percent", "101"], ["--request-rate", "0"]])
def test_bad_audit_and_battery_arguments(tiny_model_dir, png_folder, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["classify", "--model", str(tiny_model_dir), *bad, str(png_folder)])
    assert exc.value.code == 2


@pytest.mark.parametrize("args,match", [(["--max-battery-percent", "3"], "needs --horizon-h"),
                                        (["--horizon-h", "8"], "go with --max-battery-percent")])
def test_incomplete_battery_budget_is_refused(tiny_model_dir, png_folder, args, match, capsys):
    assert main(["classify", "--model", str(tiny_model_dir), *args, str(png_folder)]) == 2
    assert match in capsys.readouterr().err


def test_audit_and_battery_in_the_summary_and_json(tiny_model_dir, png_folder, capsys):
    code = main(["classify", "--model", str(tiny_model_dir), "--local-server", "--threshold", "0", "--audit-rate", "1",
                 "--audit-disagreement", "0.05", "--device-profile", "laptop", "--max-battery-percent", "1",
                 "--horizon-h", "8", "--request-rate", "2", "--json", str(png_folder)])
    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert all(line["audited"] and line["decided_on"] in ("device", "server") for line in lines[:1])
    assert lines[-1]["audit"]["audits"] >= 1 and set(lines[-1]["audit"]) == {"audits", "disagreements", "alarms",
                                                                              "recoveries", "alarm"}
    assert "audit: " in captured.err and "drift alarm" in captured.err
    assert "battery: " in captured.err and "projected over 8 h at 2 requests/s" in captured.err


def test_audit_rate_zero_turns_it_off(tiny_model_dir, png_folder, capsys):
    assert main(["classify", "--model", str(tiny_model_dir), "--local-server", "--audit-rate", "0",
                 "--audit-disagreement", "0.05", str(png_folder)]) == 0
    assert "audit:" not in capsys.readouterr().out
