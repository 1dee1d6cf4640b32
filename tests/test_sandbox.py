import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest

from llm_trm.eval import sandbox
from llm_trm.eval.sandbox import MAX_OUTPUT_CHARS, run_python

REPO = Path(__file__).resolve().parents[1]


def _needs(*levels: str) -> None:
    level = sandbox.isolation().level
    if level not in levels:
        why = sandbox.isolation().why_not_more
        pytest.skip(f"needs sandbox isolation {' or '.join(levels)}; this machine gives {level!r}: {why}")


def _processes_running(marker: str) -> list[int]:
    """Live (non-zombie) processes on this machine whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _wait_until_gone(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while _processes_running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _processes_running(marker)


def test_successful_program_passes_and_reads_stdin():
    result = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="2 3 4\n")
    assert result.passed and result.status == "ok" and result.returncode == 0
    assert result.stdout.strip() == "9"


def test_crash_is_a_failed_result_with_the_traceback():
    result = run_python("raise RuntimeError('boom')")
    assert not result.passed and result.status == "failed" and result.returncode == 1
    assert "RuntimeError: boom" in result.stderr


def test_syntax_error_is_a_failed_result():
    result = run_python("def broken(:\n")
    assert result.status == "failed" and "SyntaxError" in result.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert elapsed < 3.0


def test_memory_bomb_is_stopped():
    start = time.monotonic()
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n", memory_mb=256)
    assert result.status == "memory" and not result.passed
    assert time.monotonic() - start < 5.0


def test_child_does_not_inherit_secrets(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2-do-not-leak")
    result = run_python("import os\nprint(os.environ.get('SECRET_TOKEN', 'absent'))\nprint(sorted(os.environ))")
    assert result.passed
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[0] == "absent"


def test_runs_in_a_temporary_directory_that_is_removed():
    result = run_python("import os\nprint(os.getcwd())\nprint(os.environ['HOME'])\nopen('junk.txt', 'w').write('x')")
    assert result.passed
    cwd, home = result.stdout.splitlines()
    assert cwd == home
    assert Path(cwd).resolve() != Path.cwd().resolve()
    assert not Path(cwd).exists()


def test_output_is_truncated():
    result = run_python(f"print('x' * {MAX_OUTPUT_CHARS * 3})")
    assert result.passed
    assert len(result.stdout) < MAX_OUTPUT_CHARS + 100 and result.stdout.endswith("[truncated]")


def test_nonzero_exit_is_failed():
    result = run_python("import sys\nsys.exit(3)")
    assert result.status == "failed" and result.returncode == 3


def test_background_children_are_killed_with_the_run():
    marker = f"sandbox-child-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "print('started')\n"
    )
    result = run_python(code, timeout_s=5)
    assert result.passed and result.stdout.strip() == "started"
    assert _wait_until_gone(marker, 2.0) == []


def test_a_child_that_leaves_the_session_does_not_outlive_the_run(tmp_path):
    """setsid() escapes a process-group kill; it must not escape the run (checked by its command line,
    and by a file it would keep growing wherever it may write)."""
    _needs(sandbox.NAMESPACES_READONLY, sandbox.NAMESPACES)  # without them it survives (documented)
    marker = f"sandbox-setsid-{uuid.uuid4().hex}"
    outside = tmp_path / "ticks"
    child = (
        "import os, sys, time\n"
        "os.setsid()\n"
        "while True:\n"
        "    for path in ('ticks', sys.argv[2]):\n"
        "        try:\n"
        "            open(path, 'a').write('x')\n"
        "        except OSError:\n"
        "            pass\n"
        "    time.sleep(0.1)\n"
    )
    code = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}, {marker!r}, {str(outside)!r}])\n"
        "deadline = time.monotonic() + 5\n"
        "while not os.path.exists('ticks') and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "print('ticking' if os.path.exists('ticks') else 'never started')\n"
    )
    result = run_python(code, timeout_s=10)
    assert result.passed and result.stdout.strip() == "ticking", result.stderr
    time.sleep(1.0)
    assert _processes_running(marker) == []
    size = outside.stat().st_size if outside.exists() else 0
    time.sleep(0.5)
    assert (outside.stat().st_size if outside.exists() else 0) == size


SNOOP = """
import glob, os, subprocess, sys
canary = sys.argv[1]
seen = []
for command in (["umount", "/proc"], ["umount", "-l", "/proc"]):  # try to uncover the machine's /proc
    try:
        subprocess.run(command, capture_output=True)
    except OSError:
        pass
if canary in str(os.environ):
    seen.append("os.environ")
paths = [f"/proc/{os.getppid()}/environ"] + glob.glob("/proc/*/environ") + glob.glob("/proc/*/task/*/environ")
for path in paths:
    try:
        with open(path, "rb") as f:
            if canary.encode() in f.read():
                seen.append(path)
    except OSError:
        pass
print(f"scanned {len(paths)}; seen: {seen}")
"""


def test_cannot_read_the_environment_of_the_process_that_runs_it(tmp_path):
    """The canary is in the *initial* environment of the evaluating process (what /proc shows), so it
    is set when that process starts: a driver process stands in for the test process."""
    _needs(sandbox.NAMESPACES_READONLY, sandbox.NAMESPACES)
    canary = f"hf_canary_{uuid.uuid4().hex}"
    driver = (
        "import sys\n"
        "from llm_trm.eval.sandbox import run_python\n"
        "result = run_python(sys.argv[1] + '\\nsys.exit(0)', timeout_s=20)\n"
        "print(result.stdout + result.stderr)\n"
    )
    code = "import sys\nsys.argv[1:] = [" + repr(canary) + "]\n" + SNOOP
    env = {**os.environ, "HF_TOKEN": canary, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", driver, code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "scanned" in done.stdout, done.stdout
    assert "seen: []" in done.stdout and canary not in done.stdout


def test_cannot_connect_to_a_local_listener():
    _needs(sandbox.NAMESPACES_READONLY, sandbox.NAMESPACES)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print('refused:', error)\n"
        )
        result = run_python(code, timeout_s=10)
        assert result.passed and result.stdout.startswith("refused:"), result.stdout + result.stderr
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


def test_cannot_write_outside_its_working_directory(tmp_path):
    _needs(sandbox.NAMESPACES_READONLY)
    target = tmp_path / "written-by-the-sandbox"
    result = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "Read-only file system" in result.stderr
    assert not target.exists()


@pytest.fixture
def fresh_isolation_probe():
    sandbox.isolation.cache_clear()
    yield
    sandbox.isolation.cache_clear()


def test_without_namespaces_it_falls_back_to_limits_and_warns_once(monkeypatch, fresh_isolation_probe):
    monkeypatch.setattr(sandbox, "_probe", lambda level: "unshare: unshare failed: Operation not permitted")
    with pytest.warns(sandbox.SandboxIsolationWarning, match="less isolated.*reach the network"):
        assert sandbox.isolation().level == sandbox.LIMITS_ONLY
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sandbox.isolation().level == sandbox.LIMITS_ONLY  # cached: no second warning
        result = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="2 3\n")
    assert result.passed and result.stdout.strip() == "5"
    assert run_python("while True:\n    pass\n", timeout_s=1.0).status == "timeout"


def test_namespaces_without_a_read_only_view_still_isolate(monkeypatch, fresh_isolation_probe):
    _needs(sandbox.NAMESPACES_READONLY, sandbox.NAMESPACES)
    sandbox.isolation.cache_clear()  # _needs probed with the real levels
    real_probe = sandbox._probe
    monkeypatch.setattr(
        sandbox, "_probe", lambda level: "mount: denied" if level == sandbox.NAMESPACES_READONLY else real_probe(level)
    )
    with pytest.warns(sandbox.SandboxIsolationWarning, match="write wherever you can"):
        assert sandbox.isolation().level == sandbox.NAMESPACES
    result = run_python("import os\nprint(os.getpid(), len([p for p in os.listdir('/proc') if p.isdigit()]))")
    assert result.passed and result.stdout.split() == ["1", "1"]


def test_checked_runs_report_timeouts_and_memory_like_scripts():
    job = {"mode": "tests", "tests": "", "entry_point": ""}
    assert sandbox.run_checked({**job, "solution": "while True:\n    pass"}, timeout_s=1.0).status == "timeout"
    bomb_code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))"
    bomb = sandbox.run_checked({**job, "solution": bomb_code}, memory_mb=256)
    assert bomb.status == "memory" and not bomb.passed
    crash = sandbox.run_checked({**job, "solution": "raise RuntimeError('boom')"})
    assert crash.status == "failed" and "RuntimeError: boom" in crash.stderr
    assert sandbox.run_checked({**job, "solution": "x = 1", "tests": "assert x == 1"}).status == "ok"


def test_a_timed_out_run_leaves_no_process_behind():
    _needs(sandbox.NAMESPACES_READONLY, sandbox.NAMESPACES)  # without them a setsid() child survives (documented)
    marker = f"sandbox-timeout-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)', {marker!r}])\n"
        "while True:\n"
        "    pass\n"
    )
    assert run_python(code, timeout_s=2.0).status == "timeout"
    assert _wait_until_gone(marker, 2.0) == []
