"""Run untrusted generated code in a separate, limited Python process (pass@k tasks).

Each program runs in a fresh temporary directory (its cwd and $HOME, deleted afterwards) under `python -I`
(no user site, no PYTHON* variables), with an empty environment, no stdin, and a launcher that before exec sets
resource limits (address space, CPU seconds, file size, open files, no core dumps), drops root to `nobody` (where that user can run this Python), and cuts the network: a new
network namespace where the kernel allows one (only a loopback, down), and in every case a guard that makes
`socket` creation fail. A wall-clock timeout kills the whole process group.

This is a sandbox against accidents (infinite loops, memory bombs, stray writes, downloads), not against a determined
attacker with a kernel exploit: run evaluations of untrusted models inside a container as well.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = r"""
import ctypes, os, resource, sys
mem, cpu, fsize = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
isolated = "guard"
try:
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        isolated = "namespace"
except Exception:
    pass
os.environ["LMFORGE_SANDBOX_NET"] = isolated
def world_runnable(path):
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o005 == 0o005
if os.geteuid() == 0 and world_runnable(sys.executable):  # don't run generated code as root: become nobody
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
os.execv(sys.executable, [sys.executable, "-I", "-B", sys.argv[4]])
"""

_GUARD = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the lmforge sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _no_network
del _s, _no_network
"""


@dataclass
class SandboxResult:
    passed: bool  # exited with status 0 within the limits
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    stdout: str
    stderr: str  # last 2,000 characters
    network: str  # "namespace" (kernel isolation) or "guard" (socket creation blocked in Python)


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16) -> SandboxResult:
    """Execute `code` as a script in the sandbox; passed = exit status 0 (assertions all held)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as tmp:
        os.chmod(tmp, 0o777)
        program = Path(tmp) / "program.py"
        program.write_text(_GUARD + code, encoding="utf-8")
        os.chmod(program, 0o644)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        args = [sys.executable, "-I", "-c", _LAUNCHER, str(memory_mb * 2**20), str(int(timeout) + 1),
                str(max_file_mb * 2**20), str(program)]
        proc = subprocess.Popen(args, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, text=True, errors="replace")
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            status = "timeout"
        net = "namespace" if "namespace" in _probe_net_mode() else "guard"
        return SandboxResult(status == "passed", status, proc.returncode, out[-2000:], err[-2000:], net)


_NET_MODE: str | None = None


def _probe_net_mode() -> str:
    """Which network isolation the launcher gets on this machine (checked once per process)."""
    global _NET_MODE
    if _NET_MODE is None:
        with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as tmp:
            program = Path(tmp) / "probe.py"
            os.chmod(tmp, 0o777)
            program.write_text("import os\nprint(os.environ.get('LMFORGE_SANDBOX_NET', ''))\n")
            os.chmod(program, 0o644)
            args = [sys.executable, "-I", "-c", _LAUNCHER, str(1024 * 2**20), "5", str(2**20), str(program)]
            try:
                res = subprocess.run(args, cwd=tmp, env={"PATH": os.defpath}, capture_output=True, text=True,
                                     timeout=10)
                _NET_MODE = res.stdout.strip() or "guard"
            except subprocess.TimeoutExpired:
                _NET_MODE = "guard"
    return _NET_MODE
