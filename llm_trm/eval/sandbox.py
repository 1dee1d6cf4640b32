"""Run untrusted Python (model-written code) in a sandboxed subprocess.

Every run, on every machine, gets:
- a fresh interpreter (`python -I`) in its own temporary working directory, removed afterwards;
- an environment holding only PATH, the locale and HOME/TMPDIR set to that directory (no tokens or
  keys are passed on);
- resource limits: address space, CPU time, size of any file written, no core dumps;
- its own session, killed as a whole when the run ends or times out.

Where unprivileged user namespaces work (probed once per process, with util-linux's `unshare`,
`mount` and `setpriv`; the probe checks each promise below from inside), every run also gets:
- a network namespace with no interface up: no network at all, loopback included;
- a PID namespace in which the program is PID 1: it sees no other process on the machine (so not
  the caller's environment through /proc), and every process it starts dies with it, including
  one that left the session with setsid();
- a mount namespace in which every file system is read-only except the working directory (and the
  namespace's own /proc), with the capabilities that could undo this dropped.
If the read-only view cannot be set up, runs get the network and PID namespaces alone; if
namespaces do not work at all, runs keep only the limits of the first list. Either way a
`SandboxIsolationWarning` says so once. Without namespaces the program can see the user's other
processes and read their environment (an HF_TOKEN included), reach the network, write wherever the
user can, and a process that leaves its session outlives the run.

Never isolated: the program can read every file the user can read (with namespaces it cannot send
it anywhere, but `run_python` returns what it prints); it shares the machine's CPUs and memory
within the limits above, and the number of processes it starts is not limited (a fork bomb lasts
until the timeout).

`run_python` runs a script and passes when it exits with status 0. Code answers are judged with
`run_checked`, which runs `sandbox_harness.py` in the same sandbox: there a pass is a per-run
secret token that only the harness writes, after the program and every test completed (that module
says what this rules out and what it does not). Whatever the code does, the caller gets a
`SandboxResult`, never an exception.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Mapping

MAX_OUTPUT_CHARS = 10_000
MAX_FILE_BYTES = 16 * 1024 * 1024  # bounds files the code writes, stdout and stderr included
LOCALE_VARS = ("LANG", "LC_ALL", "LC_CTYPE")
MEMORY_ERROR_MARKERS = ("MemoryError", "Cannot allocate memory", "Unable to allocate")
HARNESS = Path(__file__).with_name("sandbox_harness.py")
PROBE_TIMEOUT_S = 30.0

NAMESPACES_READONLY = "namespaces+readonly"
NAMESPACES = "namespaces"
LIMITS_ONLY = "limits"

# New user (mapped to root, so the setup below may mount), network, PID and mount namespaces; the
# program runs as PID 1 of the new PID namespace, and dies with `unshare` (--kill-child).
UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--kill-child")
# Then the program runs with no capability at all: root of its namespaces could otherwise unmount
# the namespace's /proc (uncovering the machine's) or remount the file system writable.
DROP_CAPABILITIES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs")
# Run as root of the new namespaces before that: mount what the fstab ($0) lists (a bind mount of
# the working directory onto itself, so that it stays writable, then every other writable mount
# again, read-only), make / read-only, and enter the working directory's new mount ($1; the
# inherited cwd is the read-only one underneath).
READONLY_SETUP = 'mount -a -T "$0" && mount -o remount,bind,ro / && cd "$1" && shift && exec "$@"'
# What the probe checks, in the sandbox: PID 1 of its own namespace, no capabilities, no network,
# and (argv[1] given) a read-only file system outside its writable working directory.
PROBE_PROGRAM = """
import errno, os, socket, sys
assert os.getpid() == 1, "not in a PID namespace"
with open("/proc/self/status") as status:
    capabilities = next(line for line in status if line.startswith("CapEff:")).split()[1]
assert int(capabilities, 16) == 0, f"capabilities kept: {capabilities}"
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
except OSError as error:
    assert error.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL), f"network: {error}"
else:
    raise AssertionError("network reachable")
if len(sys.argv) > 1:
    open("writable", "w").close()
    try:
        open(sys.argv[1], "w").close()
    except OSError as error:
        assert error.errno == errno.EROFS, f"file system: {error}"
    else:
        raise AssertionError("file system writable outside the working directory")
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "ok" | "failed" | "timeout" | "memory" | "error"
    returncode: int | None
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Isolation:
    level: str  # NAMESPACES_READONLY | NAMESPACES | LIMITS_ONLY
    why_not_more: str = ""  # what failed when probing the stronger levels


class SandboxIsolationWarning(RuntimeWarning):
    """Code evaluation runs with less isolation than the sandbox can give where namespaces work."""


def minimal_environment(home: str) -> dict[str, str]:
    """PATH, locale and a HOME/TMPDIR inside the sandbox directory; nothing else."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "TMPDIR": home}
    env.update({name: os.environ[name] for name in LOCALE_VARS if name in os.environ})
    env.setdefault("LANG", "C.UTF-8")
    return env


# ------------------------------------------------------------------------------ isolation


def readonly_fstab(workdir: str) -> str:
    """fstab lines for `mount -a`: bind `workdir` onto itself, then remount read-only every writable
    mount except / (remounted apart: `mount -a` skips it) and /proc (the namespace's own)."""
    lines = [f"{_fstab_escape(workdir)} {_fstab_escape(workdir)} none bind 0 0"]
    for entry in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = entry.split()
        mount_point, options = fields[4], fields[5]  # mount points keep mountinfo's octal escapes, as fstab wants
        fs_type = fields[fields.index("-") + 1]
        if mount_point == "/" or fs_type == "proc" or mount_point.startswith("/proc/") or not options.startswith("rw"):
            continue
        # Keep the mount's other flags (nosuid, nodev, atime): a remount may not clear locked ones.
        lines.append(f"none {mount_point} none bind,remount,ro{options[2:]} 0 0")
    return "\n".join(lines) + "\n"


def _fstab_escape(path: str) -> str:
    return "".join(f"\\{ord(char):03o}" if char in " \t\n\\" else char for char in path)


def _isolated_command(level: str, argv: list[str], rundir: str, workdir: str) -> list[str]:
    if level == LIMITS_ONLY:
        return argv
    if level == NAMESPACES:
        return [*UNSHARE, *DROP_CAPABILITIES, *argv]
    fstab = os.path.join(rundir, "fstab")
    with open(fstab, "w", encoding="utf-8") as f:
        f.write(readonly_fstab(workdir))
    return [*UNSHARE, "sh", "-c", READONLY_SETUP, fstab, workdir, *DROP_CAPABILITIES, *argv]


def _probe(level: str) -> str | None:
    """None when a program runs here at `level` and finds itself isolated as promised, else what failed."""
    if not sys.platform.startswith("linux"):
        return "namespaces need Linux"
    rundir = tempfile.mkdtemp(prefix="llm_trm_sandbox_probe_")
    try:
        workdir = os.path.join(rundir, "work")
        os.mkdir(workdir)
        argv = [sys.executable, "-I", "-S", "-c", PROBE_PROGRAM]
        if level == NAMESPACES_READONLY:
            argv.append(os.path.join(rundir, "outside"))
        command = _isolated_command(level, argv, rundir, workdir)
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, cwd=workdir)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return None
    except Exception as error:  # noqa: BLE001 - whatever fails here means: not at this level
        return f"{type(error).__name__}: {error}"
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


@functools.cache
def isolation() -> Isolation:
    """The strongest isolation that works on this machine, probed once per process.

    Warns once (`SandboxIsolationWarning`) when it is less than namespaces with a read-only file system.
    """
    failures = []
    for level in (NAMESPACES_READONLY, NAMESPACES):
        problem = _probe(level)
        if problem is None:
            break
        failures.append(f"{level}: {problem}")
    else:
        level = LIMITS_ONLY
    why = "; ".join(failures)
    if level == NAMESPACES:
        warnings.warn(
            f"code evaluation is less isolated: model-written code can write wherever you can ({why})",
            SandboxIsolationWarning,
            stacklevel=2,
        )
    elif level == LIMITS_ONLY:
        warnings.warn(
            "code evaluation is less isolated: unprivileged user namespaces do not work here, so "
            "model-written code runs with resource limits only: it can see your other processes and "
            f"read their environment (tokens included), reach the network and write wherever you can ({why})",
            SandboxIsolationWarning,
            stacklevel=2,
        )
    return Isolation(level, why)


# ------------------------------------------------------------------------------ running


def _limit_resources(memory_mb: int, cpu_seconds: int) -> None:
    """Runs in the child between fork and exec: only async-safe calls here."""
    memory_bytes = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    # RLIMIT_NPROC is left alone: it counts every process of the user (other
    # workers included), so any value low enough to matter can break startup.


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_truncated(stream: IO[bytes]) -> str:
    stream.seek(0)
    text = stream.read(MAX_OUTPUT_CHARS * 4).decode("utf-8", errors="replace")
    return text if len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + "\n...[truncated]"


def _classify(returncode: int, timed_out: bool, stderr: str, completed: bool) -> str:
    """`completed`: what counts as success (status 0 for a script, the harness's report for an answer)."""
    if timed_out:
        return "timeout"
    if completed:
        return "ok"
    if any(marker in stderr for marker in MEMORY_ERROR_MARKERS) or returncode == -signal.SIGSEGV:
        return "memory"
    # SIGXCPU: the soft CPU limit; SIGKILL we did not send: the hard one (the soft one does not
    # reach a PID 1, which is what the program is inside namespaces).
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    return "failed"


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for `process` to end; True when it still runs after `timeout_s`.

    Waits on a pidfd where Linux gives one: `Popen.wait(timeout)` polls with growing sleeps, which
    adds up to tens of milliseconds to every run.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout_s)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return not poller.poll(max(0, int(timeout_s * 1000)))
    finally:
        os.close(pidfd)


@dataclass(frozen=True)
class _Finished:
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str


def _run_sandboxed(
    argv: list[str],
    stdin: str,
    timeout_s: float,
    memory_mb: int,
    files: Mapping[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    after_start: Callable[[], None] | None = None,
) -> _Finished:
    """Run `argv` in a fresh working directory (holding `files`) under the strongest isolation here."""
    rundir = tempfile.mkdtemp(prefix="llm_trm_sandbox_")
    try:
        workdir = os.path.join(rundir, "work")
        os.mkdir(workdir)
        for name, text in (files or {}).items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        command = _isolated_command(isolation().level, argv, rundir, workdir)
        # Unlinked temp files rather than pipes: a full pipe cannot block the child,
        # and a grandchild holding the descriptor cannot make us wait.
        with tempfile.TemporaryFile() as stdin_file, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            cpu_seconds = max(1, math.ceil(timeout_s)) + 1
            process = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=minimal_environment(workdir),
                start_new_session=True,
                pass_fds=pass_fds,
                preexec_fn=lambda: _limit_resources(memory_mb, cpu_seconds),
            )
            if after_start is not None:
                after_start()
            try:
                timed_out = _wait(process, timeout_s)
            finally:
                _kill_group(process.pid)
                process.wait()
            return _Finished(process.returncode, timed_out, _read_truncated(out), _read_truncated(err))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def run_python(code: str, stdin: str = "", timeout_s: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` as a script in the sandbox; passed means exit status 0."""
    if not sys.executable:
        return SandboxResult(False, "error", None, "", "no Python interpreter to run the sandbox with")
    try:
        argv = [sys.executable, "-I", "-X", "utf8", "main.py"]
        finished = _run_sandboxed(argv, stdin, timeout_s, memory_mb, files={"main.py": code})
    except (OSError, subprocess.SubprocessError) as error:
        return SandboxResult(False, "error", None, "", f"could not start the sandbox: {error}")
    except Exception as error:  # noqa: BLE001 - the caller must never see the sandbox fail
        return SandboxResult(False, "error", None, "", f"sandbox error: {error!r}")
    status = _classify(finished.returncode, finished.timed_out, finished.stderr, finished.returncode == 0)
    return SandboxResult(status == "ok", status, finished.returncode, finished.stdout, finished.stderr)


def run_checked(
    job: Mapping[str, Any], stdin: str = "", timeout_s: float = 10.0, memory_mb: int = 512
) -> SandboxResult:
    """Run a `sandbox_harness` job (a code answer and its tests) in the sandbox.

    Passed only when the harness reported, with this run's secret token, that the program and every
    test completed; the exit status, and anything the program prints, count for nothing.
    """
    if not sys.executable:
        return SandboxResult(False, "error", None, "", "no Python interpreter to run the sandbox with")
    token = secrets.token_hex(16)
    expected_report = f"{token}\n".encode("ascii")
    try:
        with tempfile.TemporaryFile() as job_file, tempfile.TemporaryFile() as report_file:
            job_file.write(json.dumps({**job, "token": token}).encode("utf-8"))
            job_file.seek(0)
            fds = (job_file.fileno(), report_file.fileno())
            argv = [sys.executable, "-I", "-S", "-X", "utf8", str(HARNESS), *map(str, fds)]
            # Our copy of the job (and its token) is closed as soon as the child holds its own.
            finished = _run_sandboxed(argv, stdin, timeout_s, memory_mb, pass_fds=fds, after_start=job_file.close)
            report_file.seek(0)
            report = report_file.read(len(expected_report) + 1)
    except (OSError, subprocess.SubprocessError) as error:
        return SandboxResult(False, "error", None, "", f"could not start the sandbox: {error}")
    except Exception as error:  # noqa: BLE001 - the caller must never see the sandbox fail
        return SandboxResult(False, "error", None, "", f"sandbox error: {error!r}")
    stderr = finished.stderr
    status = _classify(finished.returncode, finished.timed_out, stderr, report == expected_report)
    if status != "ok":
        stderr += "\nsandbox: no pass report: the program or its tests did not complete"
    return SandboxResult(status == "ok", status, finished.returncode, finished.stdout, stderr)
