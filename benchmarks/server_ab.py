"""Two server trees side by side under the same InferStream / unary load: a change against its base.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python benchmarks/server_ab.py --base /tmp/base [--clients 64] [--rounds 8] [--window-s 1]
    .venv/bin/python benchmarks/server_ab.py --base . --base-args="--event-loop asyncio"   # a setting, one tree

Starts ``splitinfer-serve`` from this checkout and from ``--base`` (another checkout of the
project: its ``protos``, ``edge``, ``cloud`` and ``export`` folders are imported in place of this
tree's, through a package folder of links made in a temporary directory), both on 127.0.0.1 with
the same settings, and drives them with benchmarks/server_load.py's load generator (InferStream
clients from Node.js when it is there, unary clients from Python workers), alternating windows
(AB, then BA), and prints the median requests/s of each and the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def package_links(tree: Path, folder: Path) -> Path:
    """folder/splitinfer/{protos,edge,cloud,export} -> the tree's folders; returns folder (for PYTHONPATH)."""
    package = folder / "splitinfer"
    package.mkdir(parents=True)
    for name in ("protos", "edge", "cloud", "export"):
        if not (tree / name).is_dir():
            raise SystemExit(f"error: {tree} has no {name}/: not a checkout of this project")
        (package / name).symlink_to(tree / name)
    return folder


def main(argv: list[str] | None = None) -> int:
    import server_load as sl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--kinds", default="stream,unary", help="stream, unary or both")
    parser.add_argument("--base-args", default="", help="extra splitinfer-serve arguments for the base server only")
    parser.add_argument("--args", dest="this_args", default="", help="extra arguments for this tree's server only")
    args = parser.parse_args(argv)
    if not (args.model_dir / "manifest.json").is_file():
        print(f"error: no model at {args.model_dir} (make demo exports one)", file=sys.stderr)
        return 2
    pruned, _full, _stats = sl.build_requests(args.model_dir, 400)
    kinds = {"unary": "pruned", "stream": "pruned" + sl.STREAM_SUFFIX}
    wanted = [k.strip() for k in args.kinds.split(",")]
    if any(k not in kinds for k in wanted):
        print(f"error: --kinds takes stream and/or unary, got {args.kinds!r}", file=sys.stderr)
        return 2
    gen = sl.LoadGenerator({"pruned": pruned, "pruned" + sl.STREAM_SUFFIX: sl.as_stream_requests(pruned, 1000)}, 2,
                           node=sl.NodeLoad.available())
    common = ("--threads", "1", "--max-queue", "4096", "--max-batch-size", "16")
    with tempfile.TemporaryDirectory(prefix="server_ab_") as tmp:
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(package_links(args.base.resolve(), Path(tmp)))
        try:
            base = sl.ServerProcess(args.model_dir, *common, *shlex.split(args.base_args))
        finally:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
        new = sl.ServerProcess(args.model_dir, *common, *shlex.split(args.this_args))
        try:
            # server_load.compare: one slice per round, the two servers in alternating order (AB, then BA)
            settings = argparse.Namespace(window_s=args.window_s, slices=1, warmup_s=0.1, timeout_ms=1000.0)
            for kind in wanted:
                for server in (base, new):
                    gen.run(server.target, args.clients, kinds[kind], 0.5, 0.1, 1.0)  # warm-up
                result = sl.compare(gen, {"this": new, "base": base}, {"this": kinds[kind], "base": kinds[kind]},
                                    args.clients, args.rounds, settings, time.monotonic() + 3600)
                print(f"{kind} at {args.clients} clients: base {result['base']['requests_per_s']:.0f} req/s, this tree "
                      f"{result['this']['requests_per_s']:.0f} req/s, ratio {result['ratio']['requests_per_s']:.3f} "
                      f"(median of {args.rounds} rounds)", flush=True)
        finally:
            base.stop()
            new.stop()
            gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
