from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
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
