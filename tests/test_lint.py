"""One linter and one formatter for the whole tree (ruff; settings in pyproject.toml):
`ruff check` and `ruff format --check` must both be clean. Fix with
`.venv/bin/ruff check --fix . && .venv/bin/ruff format .`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = [sys.executable, "-m", "ruff"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUFF, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
    out = _ruff("check", "--output-format", "concise", ".")
    assert out.returncode == 0, (
        f"ruff check found problems (fix: ruff check --fix .):\n{out.stdout}{out.stderr}"
    )


def test_ruff_format_is_applied():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, (
        f"files not formatted (fix: ruff format .):\n{out.stdout}{out.stderr}"
    )
