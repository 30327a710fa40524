"""Regenerate protos/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py from protos/*.proto.

    python scripts/gen_protos.py           # write the stubs
    python scripts/gen_protos.py --check   # exit 1 when the committed stubs are stale

The stubs import each other as ``splitinfer.protos.…``: protoc runs on a temporary tree where
the .proto sits at ``splitinfer/protos/``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        pkg = src / "splitinfer" / "protos"
        pkg.mkdir(parents=True)
        protos = sorted(PROTOS.glob("*.proto"))
        for p in protos:
            shutil.copy(p, pkg / p.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        args = ["protoc", f"-I{src}", f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}"]
        args += [str(pkg / p.name) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for f in sorted((gen / "splitinfer" / "protos").iterdir()):
            if f.name.endswith(SUFFIXES):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        for f in generate(PROTOS):
            print(f"wrote {f.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for f in generate(Path(tmp)):
            committed = PROTOS / f.name
            if not committed.is_file() or committed.read_bytes() != f.read_bytes():
                stale.append(committed.relative_to(ROOT))
    if stale:
        print("stale generated code (run python scripts/gen_protos.py): " + ", ".join(map(str, stale)))
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
