"""The client library is its own distribution (client/: studiofleet-client): installed
alone into a fresh venv it needs only grpcio and protobuf, imports none of the daemons'
heavy dependencies, and completes a clinical note against a real fleet."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import studiofleet_client
from cluster.security.identity import Role, dns_name
from studiofleet_client import errors

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "mlx",
    "mlx_lm",
    "transformers",
    "tokenizers",
    "aiohttp",
    "llguidance",
    "pydantic",
    "cryptography",
    "typer",
    "rich",
    "cluster",
    "coordinator",
    "node_agent",
)
# A transcript of a synthetic visit (no real patient).
TRANSCRIPT = "Clinician: How is the cough? Patient: Better, no fever. Clinician: Lungs clear; rest and fluids."


def _run(python: Path, *args: str, cwd: Path, timeout_s: float = 300, env: dict | None = None):
    """Run in `cwd`, away from the repository, with no PYTHONPATH: only what is installed counts."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with the studiofleet-client wheel (built from client/) and what it
    pulls in from the package index; its python."""
    base = tmp_path_factory.mktemp("client-venv")
    wheels = base / "wheels"
    built = _run(
        Path(sys.executable),
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
        str(ROOT / "client"),
        cwd=base,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("studiofleet_client-*.whl")
    venv = base / "venv"
    made = _run(Path(sys.executable), "-m", "venv", str(venv), cwd=base)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run(
        python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel), cwd=base
    )
    assert installed.returncode == 0, installed.stderr
    return python


def _site_packages_bytes(python: Path, cwd: Path) -> int:
    out = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=cwd)
    return sum(
        f.stat().st_size
        for f in Path(out.stdout.strip()).rglob("*")
        if f.is_file() and not f.is_symlink()
    )


def test_the_client_installs_alone_with_ranges_and_imports_nothing_heavy(client_venv, tmp_path):
    probe = (
        "import importlib.metadata as md, json, sys\n"
        "import studiofleet_client, studiofleet_client.errors, studiofleet_client.api\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps({'loaded': sorted(m for m in sys.modules if m.split('.')[0] in heavy),\n"
        "  'requires': md.requires('studiofleet-client'),\n"
        "  'dists': sorted(d.metadata['Name'].lower() for d in md.distributions()),\n"
        "  'file': studiofleet_client.__file__}))\n"
    )
    out = _run(client_venv, "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["loaded"] == [], f"the client imported {got['loaded']}"
    required = sorted(
        r for r in got["requires"] if "extra ==" not in r
    )  # extras are opt-in, not installed here
    assert required == ["grpcio<2,>=1.85.1", "protobuf<8,>=7.35.1"]
    assert sorted(r for r in got["requires"] if "extra ==" in r) == [
        'zeroconf>=0.154; extra == "discovery"'
    ]
    assert not got["file"].startswith(str(ROOT)), "the client came from the checkout, not the venv"
    others = set(got["dists"]) - {
        "studiofleet-client",
        "grpcio",
        "protobuf",
        "typing-extensions",
        "typing_extensions",
        "pip",
        "setuptools",
    }
    assert not others, f"installing the client pulled in {sorted(others)}"
    # Finding coordinators over mDNS is the opt-in extra: without it, a clear error naming it.
    browse = _run(
        client_venv,
        "-c",
        "from studiofleet_client.discover import discover_coordinators as d; d()",
        cwd=tmp_path,
    )
    assert (
        "DiscoveryUnavailableError" in browse.stderr
        and "studiofleet-client[discovery]" in browse.stderr
    )
    # Nothing of the daemons is there: a client-only host cannot import them.
    daemons = _run(client_venv, "-c", "import cluster", cwd=tmp_path)
    assert daemons.returncode != 0 and "No module named 'cluster'" in daemons.stderr
    full = _site_packages_bytes(Path(sys.executable), tmp_path)
    light = _site_packages_bytes(client_venv, tmp_path)
    print(
        f"site-packages: client-only venv {light / 1e6:.1f} MB, full .venv {full / 1e6:.1f} MB "
        f"({light / full:.1%})"
    )
    assert light < full / 10


def test_every_public_error_is_exported_and_none_shadows_a_builtin_or_asyncio_name():
    public = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, errors.FleetError)
    }
    assert public <= set(errors.__all__) and public <= set(studiofleet_client.__all__), sorted(
        public - set(studiofleet_client.__all__)
    )
    taken = set(dir(builtins)) | set(dir(asyncio)) | set(dir(concurrent.futures))
    clash = sorted(set(studiofleet_client.__all__) & taken)
    assert not clash, f"client names that shadow builtins or asyncio: {clash}"
    assert studiofleet_client.RequestCancelledError.code == "CANCELLED"


NOTE_SCRIPT = """
import json, sys
from studiofleet_client import ClientTLS, FleetClient, SchemaViolationError
address, server_name, tls_dir, transcript = sys.argv[1:5]
with FleetClient(address, tls=ClientTLS(tls_dir, "app"), server_name=server_name) as client:
    r = client.generate(template="soap-brief", variables={"transcript": transcript}, seed=5, temperature=1.0,
                        request_id="client-package-note", timeout_s=120)
    try:
        client.generate(template="soap-brief", variables={"transcript": transcript}, max_tokens=6,
                        request_id="client-package-short", timeout_s=60)
        truncated = None
    except SchemaViolationError as err:
        truncated = err.rule
print(json.dumps({"sections": sorted(r.output), "template": r.template, "quality": r.quality.total,
                  "nodes": r.nodes, "truncated": truncated}))
"""


def test_a_note_completes_against_a_fleet_from_the_client_only_venv(
    client_venv, node, start_coordinator, fleet_ca, tmp_path
):
    co = start_coordinator(nodes=[node.address], name="pkg-co")
    co.wait_routable(1)
    out = _run(
        client_venv,
        "-c",
        NOTE_SCRIPT,
        co.address,
        dns_name(Role.COORDINATOR, "pkg-co"),
        str(fleet_ca),
        TRANSCRIPT,
        cwd=tmp_path,
        timeout_s=180,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["sections"] == ["assessment", "objective", "plan", "subjective"]
    assert got["template"] == "soap-brief@default/v1" and got["quality"] > 0
    assert got["nodes"] == [node.node_id]
    assert got["truncated"] == "truncated"  # the typed error, raised from the light package
