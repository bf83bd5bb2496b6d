"""Regenerate the Python gRPC code from proto/: `python -m cluster.protogen`.

The code lives in the client library (client/studiofleet_client/api: the studiofleet-client
distribution); the daemons import it as cluster.api. protoc writes imports by proto path
(`from studiofleet.v1 import common_pb2`); they are rewritten to live under that package
so no top-level `studiofleet` module is needed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "client" / "studiofleet_client" / "api"
PACKAGE = "studiofleet_client.api"
_IMPORT = re.compile(r"^(from|import) studiofleet\.", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc into `out_dir`; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    written = []
    for path in sorted((out_dir / "studiofleet").rglob("*_pb2*.py*")):
        text = path.read_text()
        path.write_text(_IMPORT.sub(lambda m: f"{m.group(1)} {PACKAGE}.studiofleet.", text))
        written.append(path)
    for pkg in {p.parent for p in written} | {out_dir / "studiofleet"}:
        (pkg / "__init__.py").touch()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
