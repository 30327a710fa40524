"""splitinfer-serve in a subprocess: the listening line, a real call, graceful SIGTERM; no torch."""
from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from splitinfer.cloud.cli import main
from splitinfer.protos.manifest import load_manifest
from splitinfer.protos import splitinfer_pb2_grpc

from .conftest import RPC_TIMEOUT_S, copy_model

LISTENING = re.compile(r"^splitinfer-serve: listening on (\S+):(\d+)$")
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitinfer.cloud.cli", *args]


def _read_until_listening(proc: subprocess.Popen, timeout: float) -> tuple[list[str], str, int]:
    """Lines printed before the listening line, and the (host, port) it names."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline().decode()
        if not line:
            break
        match = LISTENING.match(line.rstrip("\n"))
        if match:
            return lines, match.group(1), int(match.group(2))
        lines.append(line)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"no listening line within {timeout} s; stdout {lines!r}; stderr:\n{err.decode()}")


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_serve_answer_and_stop_on_sigterm(tiny_model_dir: Path, make_request, tiny_manifest, event_loop) -> None:
    proc = subprocess.Popen(_serve_command("--model", str(tiny_model_dir), "--port", "0", "--grace-s", "2",
                                           "--event-loop", event_loop),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        before, host, port = _read_until_listening(proc, STARTUP_TIMEOUT_S)
        assert host == "127.0.0.1" and port > 0
        assert any(f"model {tiny_manifest.name} version {tiny_manifest.version}" in line for line in before)
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            response = splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(make_request(), timeout=RPC_TIMEOUT_S)
        assert sum(response.probabilities) == pytest.approx(1.0, abs=1e-5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"listening on" not in out  # printed exactly once, already read
    assert b"Traceback" not in err
    assert f"event_loop={event_loop}".encode() in err  # the listening log line names the loop it runs on


@pytest.mark.parametrize("problem", ["not_a_model_folder", "tampered_server_half", "duplicate_names"])
def test_bad_model_folder_exits_2_without_traceback(tiny_model_dir: Path, tmp_path: Path, problem: str) -> None:
    if problem == "not_a_model_folder":
        args = ["--model", str(tmp_path)]
    elif problem == "tampered_server_half":
        folder = copy_model(tiny_model_dir, tmp_path / "tampered")
        (folder / "server.onnx").write_bytes(b"garbage")
        args = ["--model", str(folder)]
    else:
        args = ["--model", str(tiny_model_dir), "--model", str(copy_model(tiny_model_dir, tmp_path / "twin"))]
    result = subprocess.run(_serve_command(*args, "--port", "0"), capture_output=True, timeout=STARTUP_TIMEOUT_S)
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"splitinfer-serve: error: " in result.stderr
    assert b"Traceback" not in result.stderr


def test_bad_settings_exit_2(tiny_model_dir: Path, capsys) -> None:
    assert main(["--model", str(tiny_model_dir), "--port", "70000"]) == 2
    assert "port must be in [0, 65535]" in capsys.readouterr().err
    assert main([]) == 2  # --model is required


def test_uvloop_asked_for_but_missing_exits_2(tiny_model_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert main(["--model", str(tiny_model_dir), "--port", "0", "--event-loop", "uvloop"]) == 2
    assert "uvloop is not installed" in capsys.readouterr().err
    from splitinfer.cloud.server import ServerConfig, loop_factory

    assert loop_factory("auto") is asyncio.new_event_loop  # auto falls back to asyncio's loop
    assert ServerConfig(event_loop="auto").event_loop == "auto"
    with pytest.raises(ValueError, match="event_loop must be one of"):
        ServerConfig(event_loop="trio")


def test_import_loads_no_torch() -> None:
    code = ("import sys, splitinfer.cloud, splitinfer.cloud.cli; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_repository_sighup_reload_metrics_and_json_logs(tiny_model_dir: Path, tmp_path: Path, make_request) -> None:
    import json
    import urllib.request



    repository = tmp_path / "repository"
    copy_model(tiny_model_dir, repository / "tiny" / "1")
    proc = subprocess.Popen(_serve_command("--model-repository", str(repository), "--port", "0", "--metrics-port", "0",
                                           "--log-format", "json", "--max-batch-size", "4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        before, host, port = _read_until_listening(proc, STARTUP_TIMEOUT_S)
        metrics_url = next(line.split()[-1] for line in before if "metrics on" in line)
        newer = copy_model(tiny_model_dir, repository / "tiny" / "2", variant="2")
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            assert stub.Infer(make_request(), timeout=RPC_TIMEOUT_S).request_id == "req-0"
            proc.send_signal(signal.SIGHUP)
            newer_manifest = load_manifest(newer, need=())
            new_request = make_request(manifest_sha256=newer_manifest.sha256)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:  # the reload runs in the background; the new version appears when it is done
                try:
                    assert stub.Infer(new_request, timeout=RPC_TIMEOUT_S).model_version == newer_manifest.version
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert time.monotonic() < deadline, "version 2 never served after SIGHUP"
                    time.sleep(0.05)
        text = urllib.request.urlopen(metrics_url, timeout=RPC_TIMEOUT_S).read().decode()
        assert 'splitinfer_reloads_total{result="ok"} 1.0' in text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    records = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(r["message"].startswith("reloaded: serving") for r in records)
    assert any(r.get("code") == "FAILED_PRECONDITION" and r.get("model") == "tiny" for r in records)


@pytest.mark.parametrize("args, message", [
    ([], "at least one --model"),
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--max-batch-size", "0"], "max_batch_size must be"),
    (["--padding", "bucket", "--max-queue-delay-ms", "-2"], "max_queue_delay_ms"),
    (["--auth-token-file", "/nonexistent/tokens"], "cannot read the token file"),
])
def test_bad_serving_options_exit_2(tiny_model_dir: Path, capsys, args, message) -> None:
    model = [] if not args else ["--model", str(tiny_model_dir)]
    assert main([*model, *args, "--port", "0"]) == 2
    assert message in capsys.readouterr().err
