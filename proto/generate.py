"""Generates the protobuf and gRPC modules of ``proto/`` from the ``.proto`` file.

The ``.proto`` is compiled under the virtual path ``gapaware/proto/`` so the
generated gRPC module imports its message module as ``gapaware.proto.…``, which
is where the package mapping installs it. ``python -m gapaware.proto.generate``
rewrites the checked-in modules; ``generate(tmpdir)`` lets a test compare.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PROTO_FILE = "parameter_server.proto"
GENERATED = ("parameter_server_pb2.py", "parameter_server_pb2.pyi", "parameter_server_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Compiles the .proto into ``out_dir`` and returns the generated files."""
    from grpc_tools import protoc  # build-time dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Igapaware/proto={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"gapaware/proto/{PROTO_FILE}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            target.write_bytes((pathlib.Path(tmp) / "gapaware" / "proto" / name).read_bytes())
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(PROTO_DIR):
        print(f"wrote {path}", file=sys.stderr)
