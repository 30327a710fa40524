"""Do the edge's dependencies resolve to aarch64 wheels? And fetch them for an offline install.

    python scripts/aarch64_wheels.py check                      # the whole matrix, a table; exit 1 on a surprise
    python scripts/aarch64_wheels.py download --glibc manylinux_2_28 --python 3.11 --dest DIR

``splitinfer[edge]`` (the core dependencies plus the ``edge`` extra, read from pyproject.toml with
their environment markers evaluated for Linux aarch64) is resolved by ``pip download
--only-binary=:all: --platform … --python-version …`` for each Python 3.10–3.13 and two device
families: manylinux2014 (glibc 2.17–2.27, e.g. older Raspberry Pi OS / Ubuntu 18.04) and
manylinux_2_28 (glibc 2.28 and newer: Debian 10+, Raspberry Pi OS bullseye/bookworm, Ubuntu 20.04+).
A glibc-2.28 system also accepts every older manylinux tag, so all of them are passed (pip does
not expand ``manylinux_2_28_aarch64`` by itself).

EXPECTED records what can work. Python 3.9 cannot: grpcio >= 1.81.1 (which the committed stubs
need) has no cp39 wheels, so the package requires Python >= 3.10. manylinux2014 with Python 3.12 or
3.13 cannot: no onnxruntime release has such a wheel (1.16.3 is the newest for manylinux2014 and
stops at cp311).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = {
    "manylinux2014": ["manylinux2014_aarch64", "manylinux_2_17_aarch64"],
    "manylinux_2_28": [f"manylinux_2_{m}_aarch64" for m in range(28, 16, -1)] + ["manylinux2014_aarch64"],
}
# (glibc family, python) -> None when it must resolve, else the package that has no wheel.
EXPECTED = {(g, p): None for g in PLATFORMS for p in PYTHONS}
EXPECTED[("manylinux2014", "3.12")] = "onnxruntime"
EXPECTED[("manylinux2014", "3.13")] = "onnxruntime"
FORBIDDEN = {"torch", "torchvision", "nvidia-cudnn-cu12", "triton"}


def load_pyproject(path: Path = ROOT / "pyproject.toml") -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(path.read_text())


def edge_requirements(python: str, extras: tuple[str, ...] = ("edge",), pyproject: dict | None = None) -> list[str]:
    """Core dependencies + extras, markers evaluated for CPython ``python`` on Linux aarch64."""
    project = (pyproject or load_pyproject())["project"]
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "platform_machine": "aarch64", "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            req.marker = None
            out.append(str(req))
    return out


def pip_download(requirements: list[str], glibc: str, python: str, dest: Path, timeout_s: float = 300) -> dict:
    """Run ``pip download`` for one target; returns {ok, wheels: {name: version}, files, error}."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", python, "--dest", str(dest)]
    for tag in PLATFORMS[glibc]:
        cmd += ["--platform", tag]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True, timeout=timeout_s)
    files = sorted(p.name for p in Path(dest).iterdir()) if Path(dest).is_dir() else []
    wheels = {}
    for name in files:
        if name.endswith(".whl"):
            dist, version, _, _ = parse_wheel_filename(name)
            wheels[str(dist)] = str(version)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return {"ok": proc.returncode == 0, "wheels": wheels, "files": files, "error": " ".join(errors)[-600:]}


def problems(result: dict, expected_missing: str | None) -> list[str]:
    """What is wrong with one resolution, given what EXPECTED says for it."""
    if expected_missing is not None:
        if result["ok"]:
            return [f"resolved, but EXPECTED says {expected_missing} has no wheel here: update EXPECTED and the docs"]
        if expected_missing not in result["error"]:
            return [f"failed for another reason than {expected_missing}: {result['error']}"]
        return []
    if not result["ok"]:
        return [f"does not resolve: {result['error']}"]
    out = [f"{f}: not a wheel" for f in result["files"] if not f.endswith(".whl")]
    out += [f"pulls {name}" for name in result["wheels"] if name in FORBIDDEN]
    ort, numpy = result["wheels"].get("onnxruntime"), result["wheels"].get("numpy")
    if ort and numpy and Version(ort) < Version("1.19") and Version(numpy).major >= 2:
        out.append(f"onnxruntime {ort} was built against NumPy 1.x but numpy {numpy} was picked")
    return out


def check_matrix(workers: int = 4) -> dict[tuple[str, str], dict]:
    """Resolve every (glibc family, python) target in parallel; each result gains a "problems" list."""
    def one(target):
        glibc, python = target
        with tempfile.TemporaryDirectory() as tmp:
            result = pip_download(edge_requirements(python), glibc, python, Path(tmp))
        result["problems"] = problems(result, EXPECTED[target])
        return target, result

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, EXPECTED))


def format_matrix(results: dict[tuple[str, str], dict]) -> str:
    lines = [f"{'target':<28} {'onnxruntime':>11} {'numpy':>7} {'grpcio':>7} {'protobuf':>8} {'pillow':>7}  status"]
    for (glibc, python), r in sorted(results.items()):
        w = r["wheels"] if r["ok"] else {}
        status = "ok" if r["ok"] else f"no wheel ({EXPECTED[(glibc, python)] or 'unexpected'})"
        if r["problems"]:
            status = "PROBLEM: " + "; ".join(r["problems"])
        lines.append(f"{glibc + ' aarch64 cp' + python.replace('.', ''):<28} {w.get('onnxruntime', '-'):>11} "
                     f"{w.get('numpy', '-'):>7} {w.get('grpcio', '-'):>7} {w.get('protobuf', '-'):>8} "
                     f"{w.get('pillow', '-'):>7}  {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="resolve the whole matrix and print it")
    check.add_argument("--json", action="store_true")
    down = sub.add_parser("download", help="download the edge's wheels for one target")
    down.add_argument("--glibc", choices=sorted(PLATFORMS), default="manylinux_2_28")
    down.add_argument("--python", choices=PYTHONS, default="3.11")
    down.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "download":
        args.dest.mkdir(parents=True, exist_ok=True)
        result = pip_download(edge_requirements(args.python), args.glibc, args.python, args.dest)
        print(json.dumps(result["wheels"], indent=2) if result["ok"] else result["error"])
        return 0 if result["ok"] else 1
    results = check_matrix()
    if args.json:
        print(json.dumps({f"{g} {p}": r for (g, p), r in results.items()}, indent=2))
    else:
        print(format_matrix(results))
    return 1 if any(r["problems"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
