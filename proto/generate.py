"""Regenerate the committed Python stubs (clients/pb/) from proto/epserve/v1/*.proto.

    .venv/bin/python proto/generate.py            # writes clients/pb/
    .venv/bin/python proto/generate.py OUT_DIR    # writes elsewhere (the drift test does this)

protoc names modules after the .proto path (`epserve.v1.generation_pb2`); the stubs live in
the `clients.pb` package instead, so cross-imports are rewritten to relative ones. The
descriptors keep their proto file names (`epserve/v1/*.proto`), which is what reflection
serves. Needs grpcio-tools (a dev dependency); the server and client only need the output.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "epserve" / "v1"
DEFAULT_OUT = PROTO_ROOT.parent / "clients" / "pb"
HEADER = '"""Generated from proto/epserve/v1/*.proto by proto/generate.py. Do not edit."""\n'
_CROSS_IMPORT = re.compile(r"^from epserve\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into a scratch dir, rewrite imports, and write the stubs to `out_dir`."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={scratch}", f"--pyi_out={scratch}", f"--grpc_python_out={scratch}",
                *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(scratch) / "epserve" / "v1").iterdir()):
            if src.suffix not in (".py", ".pyi"):
                continue
            if src.name.endswith("_pb2_grpc.py") and "class " not in src.read_text():
                continue  # a .proto without services: protoc still writes an empty module
            text = _CROSS_IMPORT.sub("from . import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    (out_dir / "__init__.py").write_text(HEADER)
    return [out_dir / "__init__.py", *written]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    if out == DEFAULT_OUT and out.exists():
        shutil.rmtree(out)
    for path in generate(out):
        print(path)


if __name__ == "__main__":
    main()
