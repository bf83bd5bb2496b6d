"""The generated gRPC code is current with proto/."""

from __future__ import annotations

from cluster import protogen


def test_generated_code_matches_the_protos(tmp_path):
    fresh = {p.relative_to(tmp_path) for p in protogen.generate(tmp_path)}
    committed = protogen.OUT_DIR
    assert fresh, "protoc produced nothing"
    stale = [
        str(rel)
        for rel in sorted(fresh)
        if (tmp_path / rel).read_bytes() != (committed / rel).read_bytes()
    ]
    assert not stale, f"generated code is stale: run `python -m cluster.protogen` ({stale})"
    on_disk = {p.relative_to(committed) for p in (committed / "studiofleet").rglob("*_pb2*.py*")}
    assert on_disk == fresh, "generated files without a .proto: remove them"
