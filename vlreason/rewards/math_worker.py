"""math-verify in a process of its own, killed and replaced when it runs past its limit.

Why a process: sympy and math-verify can neither be trusted to return nor be interrupted
safely in-process. An exact ``10 ** 10**10`` or a huge factorial is one C call that holds
the GIL, so no timer and no abandoned thread can stop it; and an exception raised into
sympy from a ``SIGALRM`` handler lands at an arbitrary bytecode, so caches, the import
system or antlr's shared DFA can be left half-updated for every later check. A CI run hung
for over an hour inside one reward call that way (the ``{{{...1...}}}`` case of
``tests/rewards/test_hostile.py``; earlier runs passed). A killed process leaves nothing
behind in the caller.

Layout, three processes deep::

    caller --JSON lines on stdin/stdout--> zygote --os.fork()--> checker

- The **zygote** (:func:`serve`, in a fresh interpreter) imports math-verify and
  sympy once, runs two small checks to build the parser, and then never runs a check
  itself: it forks a **checker** (copy-on-write, milliseconds, already warm), forwards
  each request to it and waits at most the request's ``timeout_s``. Past that it
  ``SIGKILL``\\ s the checker, answers ``null`` (a timeout) and forks a fresh one for the
  next request. A checker that dies (e.g. over :data:`CHECKER_MEMORY_BYTES`) answers
  ``false``.
- The **caller** (:func:`verify`) keeps a small pool of zygotes (one per concurrent
  thread), started on first use (seconds: the imports) and reused. It waits for an
  answer at most ``timeout_s`` plus :data:`ZYGOTE_GRACE_S`; a zygote that misses that
  is killed too and replaced on the next call.

Requests are ``{"pred", "gt", "free_text", "timeout_s"}``; answers ``{"result": true |
false | null}``. The zygote runs in its own session (a terminal's Ctrl-C reaches only the
caller) and exits when its stdin closes, killing its checker; on Linux both also die
with their parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vlreason.rewards import power_guard

__all__ = [
    "CHECKER_MEMORY_BYTES",
    "STARTUP_TIMEOUT_S",
    "ZYGOTE_GRACE_S",
    "MathWorkerError",
    "idle_worker_pids",
    "serve",
    "shutdown",
    "verify",
    "warm_up",
]

CHECKER_MEMORY_BYTES = 4 * 2**30
"""Address-space limit of a checker (``RLIMIT_AS``): an allocation past it fails with
``MemoryError`` inside sympy (scored as no match) instead of swapping the machine."""

STARTUP_TIMEOUT_S = 180.0
"""How long a new zygote may take to import math-verify and sympy (seconds on an idle
machine, much longer on a loaded one)."""

ZYGOTE_GRACE_S = 2.0
"""Time the caller allows the zygote beyond ``timeout_s`` (kill, reap and reply)."""

MAX_IDLE_ZYGOTES = 2


class MathWorkerError(RuntimeError):
    """The math-verify worker could not be started (not a property of any answer)."""


# --------------------------------------------------------------------------- the check


def mv_equal(pred_latex: str, gt_latex: str, free_text: bool = False) -> bool:
    """math-verify parse + verify, in this process, with math-verify's own signal-based
    timeouts off and huge exact powers refused (:mod:`vlreason.rewards.power_guard`).
    Any checker error is a non-match. Runs inside a checker; see :func:`verify`."""
    try:
        with power_guard.guarded():
            return mv_equal_unguarded(pred_latex, gt_latex, free_text)
    except power_guard.TooLarge:
        return False
    except Exception:  # a checker error is a non-match, never a crashed training step
        return False


def mv_equal_unguarded(pred_latex: str, gt_latex: str, free_text: bool) -> bool:
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # The worker provides the time limit; silence the one-time "timeout disabled" warning.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    latex_only = [math_verify.LatexExtractionConfig()]
    gold = math_verify.parse(gt_latex, extraction_config=latex_only, parsing_timeout=None)
    if free_text:  # lenient: find the answer anywhere in the text (math-verify defaults)
        target = math_verify.parse(pred_latex, parsing_timeout=None)
    else:
        target = math_verify.parse(pred_latex, extraction_config=latex_only, parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(math_verify.verify(gold, target, timeout_seconds=None))


DEFAULT_CHECK = "vlreason.rewards.math_worker:mv_equal"
WARM_UP_CHECKS = (("$3$", "$3.0$"), ("$\\frac{1}{2} + x^2$", "$x^{2} + 0.5$"))


# --------------------------------------------------------------------------- zygote side


def _read_json_line(stream: IO, timeout_s: float | None, who: str) -> Any:
    """The next JSON line from a pipe to ``who``; None when nothing arrived within
    ``timeout_s`` (None: wait); EOFError when ``who`` has exited. One request is in flight
    at a time, so a buffered reader never holds a second line that select cannot see."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        return None
    line = stream.readline()
    if not line:
        raise EOFError(f"{who} exited")
    return json.loads(line)


def _die_with_parent() -> None:
    """Linux: receive SIGKILL when the parent process dies (best effort elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _load_check(path: str) -> Callable[[str, str, bool], bool]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _checker_loop(requests: int, answers: int, check: Callable[[str, str, bool], bool]) -> None:
    """In the forked checker: answer requests (pred, gt, free_text) until EOF."""
    _die_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHECKER_MEMORY_BYTES, CHECKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    reader = os.fdopen(requests, "r", encoding="utf-8", errors="surrogatepass")
    writer = os.fdopen(answers, "w", encoding="utf-8")
    for line in reader:
        pred, gt, free_text = json.loads(line)
        writer.write(json.dumps(bool(check(pred, gt, free_text))) + "\n")
        writer.flush()


class _Checker:
    """The zygote's handle on one forked checker."""

    def __init__(self, protocol_fd: int, check: Callable[[str, str, bool], bool]) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # checker
            try:
                os.close(req_w)
                os.close(ans_r)
                # The zygote's protocol pipes are not the checker's: holding the answer
                # pipe open would hide the zygote's death from the caller.
                os.close(0)
                os.close(protocol_fd)
                _checker_loop(req_r, ans_w, check)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(ans_w)
        self.pid = pid
        self.requests = os.fdopen(req_w, "w", encoding="utf-8")
        self.answers = os.fdopen(ans_r, "r", encoding="utf-8")

    def ask(self, pred: str, gt: str, free_text: bool, timeout_s: float | None) -> bool | None:
        """True/False, or None past ``timeout_s``; raises OSError/EOFError if it died."""
        self.requests.write(json.dumps([pred, gt, free_text]) + "\n")
        self.requests.flush()
        answer = _read_json_line(self.answers, timeout_s, "checker")
        return None if answer is None else bool(answer)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        for stream in (self.requests, self.answers):
            try:
                stream.close()
            except OSError:
                pass


def serve(check_path: str | None = None) -> None:
    """The zygote's main loop: JSON-line requests on stdin, answers on the original stdout
    only. ``check_path`` (``"module:function"``, default ``sys.argv[1]``, else
    :data:`DEFAULT_CHECK`) is what the checkers run: ``(pred, gt, free_text) -> bool``."""
    _die_with_parent()
    if check_path is None:
        check_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CHECK
    check = _load_check(check_path)
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # a stray print from a library cannot corrupt the protocol
    for pred, gt in WARM_UP_CHECKS:  # imports and parser construction, before any fork
        mv_equal(pred, gt)
    protocol.write(json.dumps({"ready": os.getpid()}) + "\n")
    protocol.flush()

    checker: _Checker | None = None
    stdin = open(0, encoding="utf-8", errors="surrogatepass", closefd=False)  # noqa: SIM115
    try:
        for line in stdin:
            request = json.loads(line)
            if checker is None:
                checker = _Checker(protocol.fileno(), check)
            try:
                result = checker.ask(
                    request["pred"], request["gt"], request["free_text"], request["timeout_s"]
                )
            except (OSError, EOFError, ValueError):  # the checker died (memory limit, crash)
                result = False
                checker.kill()
                checker = None
            answer: dict[str, Any] = {"result": result}
            if result is None:  # past the limit: the checker may be stuck in C; kill it
                answer["killed"] = checker.pid
                checker.kill()
                checker = None
            protocol.write(json.dumps(answer) + "\n")
            protocol.flush()
    finally:
        if checker is not None:
            checker.kill()


# --------------------------------------------------------------------------- caller side


class _Zygote:
    """The caller's handle on one zygote process."""

    def __init__(self, check: str = DEFAULT_CHECK) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from vlreason.rewards.math_worker import serve; serve()", check],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.stdin: IO[bytes] = self.process.stdin  # type: ignore[assignment]
        self.stdout: IO[bytes] = self.process.stdout  # type: ignore[assignment]
        self.ready = False
        self.last_killed: int | None = None  # pid of the checker killed by the last timeout

    def _read(self, timeout_s: float | None) -> dict[str, Any] | None:
        return _read_json_line(self.stdout, timeout_s, "math-verify zygote")

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            message = self._read(STARTUP_TIMEOUT_S)
        except EOFError:
            message = None
        if not message or "ready" not in message:
            self.kill()
            raise MathWorkerError(
                f"the math-verify worker ({sys.executable}, vlreason.rewards.math_worker.serve) "
                f"did not start within {STARTUP_TIMEOUT_S:.0f} s (exit code "
                f"{self.process.poll()}); is math-verify installed in this environment?"
            )
        self.ready = True

    def ask(self, pred: str, gt: str, free_text: bool, timeout_s: float | None) -> bool | None:
        request = {"pred": pred, "gt": gt, "free_text": free_text, "timeout_s": timeout_s}
        data = json.dumps(request).encode("utf-8") + b"\n"
        self.stdin.write(data)
        self.stdin.flush()
        wait = None if timeout_s is None else timeout_s + ZYGOTE_GRACE_S
        message = self._read(wait)
        if message is None:
            raise TimeoutError("math-verify zygote did not answer")
        result = message["result"]
        self.last_killed = message.get("killed")
        return None if result is None else bool(result)

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.stdin, self.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _Pool:
    """Idle zygotes of this process; a call takes one for its duration."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: list[_Zygote] = []

    def take(self) -> _Zygote:
        with self.lock:
            zygote = self.idle.pop() if self.idle else None
        if zygote is None:
            zygote = _Zygote()
        zygote.wait_ready()
        return zygote

    def give_back(self, zygote: _Zygote) -> None:
        with self.lock:
            if len(self.idle) < MAX_IDLE_ZYGOTES:
                self.idle.append(zygote)
                return
        zygote.kill()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for zygote in idle:
            zygote.kill()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _current_pool() -> _Pool:
    """This process's pool (a forked child starts its own: pipes are not shared)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = _Pool()
        return _pool


def verify(
    pred_latex: str, gt_latex: str, *, free_text: bool = False, timeout_s: float | None = 5.0
) -> bool | None:
    """Whether math-verify finds the two LaTeX answers equal: True or False, or None when
    the check ran past ``timeout_s`` seconds (its process was killed). ``None``, ``0``,
    a negative or an infinite ``timeout_s`` means no limit.

    Raises :class:`MathWorkerError` only if no worker can be started at all.
    """
    if timeout_s is None or timeout_s <= 0 or math.isinf(timeout_s):
        timeout_s = None
    pool = _current_pool()
    zygote = pool.take()
    try:
        result = zygote.ask(pred_latex, gt_latex, free_text, timeout_s)
    except (OSError, EOFError, ValueError, TimeoutError):
        zygote.kill()  # dead or stuck itself: the next call starts a new one
        return None
    except BaseException:  # e.g. KeyboardInterrupt mid-request: its answer is unread
        zygote.kill()
        raise
    pool.give_back(zygote)
    return result


def warm_up() -> None:
    """Start a worker now (seconds), so the first timed check does not pay for it."""
    pool = _current_pool()
    pool.give_back(pool.take())


def shutdown() -> None:
    """Stop this process's idle workers (they also stop by themselves when it exits)."""
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close()


def idle_worker_pids() -> list[int]:
    """Process ids of this process's idle zygotes."""
    pool = _current_pool()
    with pool.lock:
        return [z.process.pid for z in pool.idle]

