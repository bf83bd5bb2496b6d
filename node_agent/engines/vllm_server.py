"""The vLLM OpenAI-compatible server as a child process of the node agent.

The child runs in a process group of its own (vLLM forks an engine-core and worker
processes): stopping sends SIGTERM to the whole group, then SIGKILL after a grace, so
nothing is left behind. On Linux the child also gets SIGTERM if the agent dies
(PR_SET_PDEATHSIG), and a pid file in the state directory lets the next agent kill a
group that outlived a SIGKILLed agent. The child listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

# The child must never phone home (vLLM usage stats) or reach a model hub.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
}
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PID_FILE = "vllm-server.pid"
LOG_FILE = "vllm-server.log"
_HEALTH_POLL_S = 0.25
# Sets PR_SET_PDEATHSIG (1) = SIGTERM (15) in the child, then execs the server: the child
# hears of the agent's death even when the agent is SIGKILLed (Linux only).
_PDEATHSIG_EXEC = (
    "import ctypes, os, sys\n"
    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, 15)\n"
    "except Exception:\n    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class ServerError(RuntimeError):
    """The vLLM server could not be started, or stopped answering; the message says why."""


def has_vllm(python: str, timeout_s: float = 60.0) -> bool:
    """Whether `python` can import vllm (found, not imported: that takes seconds); raises
    OSError or subprocess.TimeoutExpired if it cannot be run."""
    import subprocess

    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return (
        subprocess.run([python, "-c", probe], capture_output=True, timeout=timeout_s).returncode
        == 0
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class VllmServer:
    """One child `python -m vllm.entrypoints.openai.api_server`; start, watch, stop."""

    def __init__(
        self,
        *,
        python: str,
        extra_args: Sequence[str] = (),
        state_dir: Path,
        port: int = 0,
        startup_timeout_s: float = 600.0,
        stop_grace_s: float = 15.0,
    ):
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.state_dir = Path(state_dir)
        self.host = "127.0.0.1"
        self._want_port = port
        self.port = 0
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.started_at = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    def command(
        self, model_path: Path, served_name: str, *, max_model_len: int, max_num_seqs: int
    ) -> list[str]:
        return [
            self.python,
            "-m",
            SERVER_MODULE,
            "--model",
            str(model_path),
            "--served-model-name",
            served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(max_num_seqs),
            # Schema-constrained JSON with vLLM's llguidance backend: the same JSON Schema
            # compiler as MLX nodes and the coordinator's check, so a schema accepted anywhere
            # is enforced alike everywhere; no free whitespace (a server setting, not a request's).
            "--structured-outputs-config",
            '{"backend": "guidance", "disable_any_whitespace": true}',
            *self.extra_args,
        ]

    async def start(
        self, session, model_path: Path, served_name: str, *, max_model_len: int, max_num_seqs: int
    ) -> None:
        """Start the child and wait until /health answers 200; raises ServerError (child stopped)."""
        await asyncio.to_thread(self.kill_stale)
        self.port = self._want_port or free_port(self.host)
        cmd = self.command(
            model_path, served_name, max_model_len=max_model_len, max_num_seqs=max_num_seqs
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **CHILD_ENV}
        launcher = (
            [self.python, "-c", _PDEATHSIG_EXEC, self.python]
            if sys.platform == "linux"
            else [self.python]
        )
        log.info("starting vLLM server on %s: %s", self.base_url, shlex.join(cmd))
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n".encode())
            out.flush()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *launcher,
                    *cmd[1:],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ServerError(
                    f"cannot run {self.python} ({exc.strerror}); set vllm_python to the Python "
                    "of a virtualenv with vLLM installed"
                ) from None
        self.started_at = time.monotonic()
        (self.state_dir / PID_FILE).write_text(str(self.proc.pid))
        try:
            await self._wait_healthy(session)
        except BaseException:
            await self.stop()
            raise

    async def _wait_healthy(self, session) -> None:
        import aiohttp

        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.returncode is not None:
                raise ServerError(
                    f"the vLLM server {describe_exit(self.proc.returncode)} during start-up; "
                    f"its log ({self.log_path}) ends: {self.log_tail()}"
                )
            try:
                async with session.get(
                    f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    if r.status == 200:
                        log.info(
                            "vLLM server pid %d ready on %s after %.1fs",
                            self.proc.pid,
                            self.base_url,
                            time.monotonic() - self.started_at,
                        )
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the vLLM server did not answer /health within {self.startup_timeout_s:g}s; "
                    f"raise vllm_startup_timeout_s or see {self.log_path}: {self.log_tail()}"
                )
            await asyncio.sleep(_HEALTH_POLL_S)

    async def wait_exit(self) -> int:
        return await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace; idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=self.stop_grace_s)
            except TimeoutError:
                log.warning(
                    "vLLM server pid %d ignored SIGTERM for %.0fs; killing it",
                    proc.pid,
                    self.stop_grace_s,
                )
        # The server exiting is not enough: its engine-core and workers share the group.
        _killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / PID_FILE).unlink()

    def kill_group_now(self) -> None:
        """From any thread, at exit: SIGKILL the child's group (no waiting)."""
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGKILL)

    def kill_stale(self) -> None:
        """Kill a server group left by an agent that died without stopping it."""
        pid_file = self.state_dir / PID_FILE
        try:
            pgid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if pgid > 1 and _is_vllm_group(pgid):
            log.warning("killing vLLM server group %d left by a previous agent", pgid)
            _killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()

    def log_tail(self, lines: int = 6) -> str:
        """The last lines of the server's log, joined; start-up output only (vLLM does not
        log prompts unless told to)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(line.strip()[:300] for line in tail if line.strip()) or "(empty)"


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _is_vllm_group(pgid: int) -> bool:
    """Whether group `pgid` still has a vLLM process in it (its leader may be gone while the
    engine-core lives on); never kill a group whose id was reused by something else."""
    import psutil

    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            if os.getpgid(p.pid) != pgid:
                continue
        except OSError:
            continue
        text = " ".join(p.info.get("cmdline") or []) + " " + (p.info.get("name") or "")
        if "vllm" in text.lower():
            return True
    return False
