"""Runs inside the sandbox: a code answer, then its tests, and a pass report the answer cannot forge.

`llm_trm.eval.sandbox.run_checked` starts it as `python -I -S sandbox_harness.py JOB_FD REPORT_FD`.
It imports nothing from llm_trm (the sandboxed interpreter sees only the standard library).

The job, JSON read from JOB_FD (closed before any answer code runs), holds a per-run random token
and one of:
  {"mode": "script", "solution": SRC}            a stdin/stdout program, run as __main__
  {"mode": "tests", "solution": SRC, "tests": SRC, "trusted": SRC, "entry_point": NAME}
  {"mode": "calls", "solution": SRC, "fn_name": NAME, "cases": [[ARGS, EXPECTED], ...]}
The harness writes `token + "\\n"` to REPORT_FD only after the program ended normally and, for
"tests" and "calls", every test ran and passed; the parent accepts nothing else as a pass. So an
answer that exits early (sys.exit, os._exit, a signal), crashes, raises SystemExit inside the tests
or prints something that looks like a verdict leaves no report and fails.

Why the answer cannot write the report itself:
- The answer and its tests run in a worker thread, which holds the token (and the harness's code)
  in its own frame, below the answer's. The one route to a frame that CPython does not audit is a
  signal handler (it receives the interrupted frame), and handlers are installed from, and run in,
  the main thread only: the main thread ignores SIGINT, starts the worker and then blocks for good
  on a lock nobody can release, never running Python again. The worker writes the report (or not)
  and ends the process with os._exit, skipping atexit handlers and the answer's threads.
- An audit hook, installed before the answer runs (it cannot be removed), refuses the audited
  routes to frames, objects, memory and the outside: sys._getframe, sys._current_frames,
  tracebacks' and generators' frames, gc.get_objects/get_referrers/get_referents,
  sys.settrace/setprofile, further audit hooks, new code objects, ctypes and every module outside
  the standard library, /proc/*/mem and /proc/*/environ, starting processes, signalling other
  processes, sockets.
- The harness decides: any exception from the answer or the tests (SystemExit included) fails.
  In "tests" mode the tests see the builtins and the standard-library modules they name (`math`
  for `math.isclose`) as they were before the answer ran, the trusted prompt stub's helpers rather
  than the answer's versions of them, and the entry point's results only once checked to be plain
  values (an object that compares equal to everything is refused); in "calls" mode the harness
  compares plain values itself.
Not covered: an answer that corrupts the interpreter's memory (a CPython bug, crafted bytecode)
could read the token; an answer can still change what a test computes through objects the test
hands it, or through functions of a Python-level module that the test calls. Answers may import
only the standard library.
"""

import builtins
import json
import os
import signal
import sys
import threading  # imported here, in the main thread, so threading.main_thread() is this one
import traceback
import types
import _thread

# Functions defined below look builtins up in this copy, taken before any answer runs, so an answer
# that patches `builtins` cannot change what the harness does.
PRISTINE_BUILTINS = dict(builtins.__dict__)
__builtins__ = PRISTINE_BUILTINS

# Answers checked by tests are imported, not run, as HumanEval's harness does: `if __name__ == "__main__"` stays out.
SOLUTION_MODULE = "__solution__"
MAX_REPR = 200

REFUSED_EVENTS = frozenset(
    {
        "sys._current_frames",
        "sys._current_exceptions",
        "sys.settrace",
        "sys.setprofile",
        "sys.monitoring.register_callback",
        "sys.remote_exec",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "code.__new__",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "os.killpg",
        "subprocess.Popen",
        "pty.spawn",
        "socket.__new__",
        "socket.bind",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
    }
)
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
PROC_FILES = frozenset({"mem", "environ"})  # another process's memory or environment
ALLOWED_MODULES = frozenset(sys.stdlib_module_names)
# Standard-library modules that read raw memory or start processes without an audit event.
REFUSED_MODULES = frozenset({"ctypes", "_ctypes", "_ctypes_test", "_posixsubprocess"})
REFUSED_MODULE_PREFIXES = ("_test", "_xx", "xx")
# Modules that tests use by name and that the harness may import for them before the answer runs
# (none of them loads a refused module as a side effect).
TEST_MODULES = frozenset(
    {
        "array", "bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions", "functools",
        "heapq", "itertools", "json", "math", "operator", "random", "re", "statistics", "string", "typing",
    }
)
TYPE_FLAGS = type.__dict__["__flags__"]
HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class written in Python (C types cannot be patched)
WHOLE = slice(None)


# ------------------------------------------------------------------------------ the audit hook


def _exact_text(value):
    """The characters of a str or bytes (subclasses included, read through the base type), else None."""
    if isinstance(value, str):
        return str.__getitem__(value, WHOLE)
    if isinstance(value, bytes):
        return str(bytes.__getitem__(value, WHOLE), "utf-8", "surrogateescape")
    return None


def _module_refused(name: str) -> bool:
    parts = str.split(name, ".")
    if parts[0] not in ALLOWED_MODULES:
        return True
    return any(part in REFUSED_MODULES or str.startswith(part, REFUSED_MODULE_PREFIXES) for part in parts)


def _import_refused(args) -> bool:
    name = _exact_text(args[0])
    if name is None or _module_refused(name):
        return True
    filename = _exact_text(args[1]) if len(args) > 1 and args[1] is not None else None
    if filename is None:
        return False
    stem = str.partition(str.rpartition(filename, "/")[2], ".")[0]  # lib-dynload/_ctypes.cpython-311-....so
    return stem in REFUSED_MODULES or str.startswith(stem, REFUSED_MODULE_PREFIXES)


def _open_refused(path) -> bool:
    if type(path) is int:
        return False
    text = _exact_text(path)
    if text is None:
        return True  # a path object could name one file here and another when opened
    return str.rpartition(str.rstrip(text, "/"), "/")[2] in PROC_FILES


def make_guard(own_pid: int):
    """The audit hook that keeps the answer away from the harness and the outside (see the docstring)."""

    def guard(event, args):
        if event in REFUSED_EVENTS or str.startswith(event, "ctypes."):
            raise PermissionError(f"sandbox: {event} is not available to code answers")
        if event == "sys._getframe":
            raise ValueError("sandbox: frames are not available to code answers")  # what a too-deep call raises
        if event == "object.__getattr__" and _exact_text(args[1]) in FRAME_ATTRIBUTES:
            raise AttributeError(f"sandbox: {args[1]} is not available to code answers")
        if event == "sys.addaudithook":
            raise RuntimeError("sandbox: no further audit hooks")  # CPython then silently skips the new hook
        if event == "import" and _import_refused(args):
            raise ImportError(
                f"sandbox: code answers may not import {args[0]!s:.80} (only the standard library, "
                "without the modules that read memory or start processes)"
            )
        if event == "open" and _open_refused(args[0]):
            raise PermissionError(f"sandbox: opening {args[0]!r:.80} is not allowed to code answers")
        if event == "os.kill" and args[0] != own_pid:
            raise PermissionError("sandbox: code answers may not signal other processes")

    return guard


# ------------------------------------------------------------------------------ plain values


# How to read an instance of a subclass of each built-in type through the built-in's own methods,
# which check the real type and ignore overrides.
BUILTIN_READERS = (
    int.__int__,
    float.__float__,
    lambda v: complex(complex.real.__get__(v, complex), complex.imag.__get__(v, complex)),
    lambda v: str.__getitem__(v, WHOLE),
    lambda v: bytes.__getitem__(v, WHOLE),
    lambda v: list(list.__iter__(v)),
    lambda v: tuple(tuple.__iter__(v)),
    lambda v: dict(dict.items(v)),
    lambda v: set(set.__iter__(v)),
    lambda v: frozenset(frozenset.__iter__(v)),
)


def _as_builtin(value):
    """An instance of a subclass of a built-in type (Counter, namedtuple, an int subclass) as that
    built-in, wrapped in a 1-tuple; None when its class derives from none of them."""
    for read in BUILTIN_READERS:
        try:
            return (read(value),)
        except TypeError:  # not an instance of that built-in
            continue
    return None


def plain(value, lists_for_tuples=False):
    """`value` rebuilt from built-in types only, so comparing it runs no code the answer wrote.

    Subclasses of built-ins (Counter, namedtuple, an int subclass) become the built-in; instances of
    other classes written in Python are refused; other C-level objects (deque, Decimal, generators)
    pass through as they are, since their comparisons cannot be overridden.
    """
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is complex or kind is str or kind is bytes:
        return value
    if kind is list or (kind is tuple and lists_for_tuples):
        return [plain(item, lists_for_tuples) for item in value]
    if kind is tuple:
        return tuple(plain(item, lists_for_tuples) for item in value)
    if kind is dict:
        return {plain(key, lists_for_tuples): plain(item, lists_for_tuples) for key, item in dict.items(value)}
    if kind is set or kind is frozenset:
        return kind(plain(item, lists_for_tuples) for item in value)
    converted = _as_builtin(value)
    if converted is not None:
        return plain(converted[0], lists_for_tuples)
    if TYPE_FLAGS.__get__(kind, type) & HEAP_TYPE or lists_for_tuples:
        name = type.__dict__["__name__"].__get__(kind, type)
        raise TypeError(f"the answer returned an instance of {name}, not a plain value")
    return value


def plain_results(function):
    """`function`, with its results passed through `plain` before a test sees them."""

    def call(*args, **kwargs):
        return plain(function(*args, **kwargs))

    return call


# ------------------------------------------------------------------------------ the stages


def _clean_exit(code) -> bool:
    return code is None or (type(code) is int and code == 0)


def _join_program_threads() -> None:
    """Wait for the threads the program started, as the interpreter would before exiting."""
    current, main_thread = threading.current_thread(), threading.main_thread()
    for thread in threading.enumerate():
        if thread is not current and thread is not main_thread and not thread.daemon:
            thread.join()


def _flush(streams) -> None:
    for flush in streams:
        try:
            flush()
        except ValueError:  # the program closed the stream, which flushed it
            pass


def _module(name: str) -> dict:
    module = types.ModuleType(name)
    module.__dict__["__builtins__"] = builtins
    # The answer becomes __main__ so that nothing in sys.modules leads back to this harness.
    sys.modules["__main__"] = sys.modules[name] = module
    return module.__dict__


def _compile(source: str, filename: str):
    return compile(source, filename, "exec", dont_inherit=True, optimize=0)


def _names(code) -> set:
    """Every global, attribute and imported name a code object (and those nested in it) uses."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names(constant)
    return names


def module_snapshots(tests) -> dict:
    """Copies, taken before the answer runs, of the common standard-library modules the tests name,
    so that an answer that patches or shadows one (`math.isclose = ...`, `class math: ...`) does not
    change what the tests compute."""
    snapshots = {}
    for name in _names(tests) & TEST_MODULES:
        module = __import__(name)
        snapshot = types.ModuleType(name)
        snapshot.__dict__.update(module.__dict__)
        snapshots[name] = snapshot
    return snapshots


def tests_builtins(snapshots: dict) -> dict:
    """Builtins for the tests: the copy taken before the answer ran, importing `snapshots` by name."""
    real_import = PRISTINE_BUILTINS["__import__"]

    def import_for_tests(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in snapshots:
            return snapshots[name]
        return real_import(name, globals, locals, fromlist, level)

    return {**PRISTINE_BUILTINS, "__import__": import_for_tests}


def prepare(job: dict):
    """Compile everything and build the function the worker runs; nothing of the answer runs yet."""
    mode = job["mode"]
    solution = _compile(job["solution"], "solution.py")
    streams = (sys.stdout.flush, sys.stderr.flush)  # the real streams, even if the answer replaces sys.stdout

    if mode == "script":
        namespace = _module("__main__")

        def run_script():
            try:
                exec(solution, namespace)
            except SystemExit as stop:
                if not _clean_exit(stop.code):
                    raise
            finally:
                _flush(streams)
            _join_program_threads()
            _flush(streams)

        return run_script

    if mode == "tests":
        tests = _compile(job["tests"], "tests.py")
        entry_point = job.get("entry_point") or ""
        trusted = {"__builtins__": dict(PRISTINE_BUILTINS)}  # its helpers keep clean builtins too
        exec(_compile(job.get("trusted") or "", "prompt.py"), trusted)
        helpers = {name: value for name, value in trusted.items() if name != entry_point and not name.startswith("__")}
        snapshots = module_snapshots(tests)
        namespace = _module(SOLUTION_MODULE)

        def run_tests():
            try:
                exec(solution, namespace)
                scope = dict(namespace)
                scope["__builtins__"] = tests_builtins(snapshots)
                scope.update(snapshots)
                scope.update(helpers)
                if entry_point:
                    if entry_point not in scope:
                        raise NameError(f"the answer does not define {entry_point!r}")
                    scope[entry_point] = plain_results(scope[entry_point])
                exec(tests, scope)
            finally:
                _flush(streams)

        return run_tests

    if mode == "calls":
        fn_name = job["fn_name"]
        cases = [(list(args), expected) for args, expected in job["cases"]]
        namespace = _module(SOLUTION_MODULE)

        def run_calls():
            try:
                exec(solution, namespace)
                if "Solution" in namespace:  # LeetCode style
                    target = getattr(namespace["Solution"](), fn_name)
                elif fn_name in namespace:
                    target = namespace[fn_name]
                else:
                    raise NameError(f"the answer does not define {fn_name!r}")
                for index, (args, expected) in enumerate(cases):
                    result = plain(target(*args), lists_for_tuples=True)
                    if not (result == expected or [result] == expected):
                        got, wanted = f"{result!r:.{MAX_REPR}}", f"{expected!r:.{MAX_REPR}}"
                        raise AssertionError(f"case {index}: expected {wanted}, got {got}")
            finally:
                _flush(streams)

        return run_calls

    raise ValueError(f"unknown job mode {mode!r}")


def report_failure(error: BaseException) -> None:
    """What went wrong, on stderr. Frames are out of reach now, so tracebacks give line numbers only."""
    try:
        lines, tb = [], error.__traceback__
        while tb is not None:
            lines.append(str(tb.tb_lineno))
            tb = tb.tb_next
        lines = lines[2:]  # the worker's and the stage's own lines
        summary = "".join(traceback.format_exception_only(type(error), error)).strip()
        where = f" (at line {' > '.join(lines)})" if lines else ""
        os.write(2, f"{summary[: MAX_REPR * 5]}{where}\n".encode("utf-8", "replace"))
    except BaseException:  # noqa: BLE001 - the answer's exception may itself misbehave
        os.write(2, b"the answer or its tests failed\n")


def worker(stages, report_fd: int, report: bytes, write, leave) -> None:
    """Runs the answer and its tests; writes the report if they all completed; ends the process."""
    passed = False
    try:
        stages()
        passed = True
    except BaseException as error:  # noqa: BLE001 - every failure of the answer is a failed test
        report_failure(error)
    finally:
        if passed:
            write(report_fd, report)
        leave(0)  # skips atexit handlers and whatever threads the answer left running


def main() -> None:
    job_fd, report_fd = int(sys.argv[1]), int(sys.argv[2])
    with open(job_fd, "rb") as job_file:
        job = json.loads(job_file.read())
    report = job.pop("token").encode("ascii") + b"\n"
    # `exit()` and `quit()` come from `site`, which this interpreter does not load (-S); programs use them.
    builtins.exit = builtins.quit = sys.exit
    try:
        stages = prepare(job)
    except SyntaxError as error:
        os.write(2, "".join(traceback.format_exception_only(type(error), error)).encode("utf-8", "replace"))
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # no Python-level signal handler remains
    sys.addaudithook(make_guard(os.getpid()))
    _thread.start_new_thread(worker, (stages, report_fd, report, os.write, os._exit))
    del job, stages, report
    # The main thread never runs Python again, so nothing can install or run a signal handler here.
    never = _thread.allocate_lock()
    never.acquire()
    never.acquire()


if __name__ == "__main__":
    main()
