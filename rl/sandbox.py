"""Run untrusted Python in a sandbox: the executor behind the code-execution reward (issue 6).

    result = run_python("print(input()[::-1])", stdin="abc", limits=Limits(wall_s=2.0))
    assert result.status is Status.OK and result.stdout == "cba\\n"

This file is the parent side. Each run starts `python -I -S -B -X utf8` (no site-packages, no
PYTHON* variables) on rl/sandbox_child.py, the in-sandbox half, as a bootstrap, in a new
session, in a private temporary work directory that is deleted afterwards, with an environment
of PATH, LANG, HOME and TMPDIR only. The bootstrap enters the namespaces below, then forks the
program (which drops privileges, sets its limits and runs the code as __main__) and stays as
its supervisor: a child subreaper, so it reaps everything the program starts, and it kills all
of it when the program exits or when the parent asks (wall clock, output cap).
`detect_isolation()` probes once which layers the machine allows; a run uses exactly those, and
a layer that then fails to come up is a SANDBOX_ERROR, never a silent downgrade.

- Dedicated uid (parent is root): the program runs as a fresh uid that no process uses, so
  kernel permissions keep it out of other users' files and processes (/proc/<pid>/environ
  included), RLIMIT_NPROC counts exactly this run's processes, and cleanup kills every process
  of that uid, also children that left the session.
- Network namespace (root, or an unprivileged user namespace): only a down loopback, so no
  connection to the host or beyond; a private IPC namespace with it.
- Read-only filesystem (mount namespace, Linux >= 5.12): every mount read-only and nosuid except
  the work directory. If the sandbox uid cannot read the Python installation (say, under
  /root), the installation is bind-mounted where it can and sys.path follows.
- Audit hook (PEP 578), installed before the program, defense in depth: refuses sockets,
  ctypes, subinterpreters, exec/spawn/system/subprocess, signals, fork unless a dedicated uid
  bounds it, opening other processes' /proc entries, and writes, deletions, renames and
  directory opens outside the work directory. Determined code can get around an in-process
  hook; it is the only network and filesystem barrier where the kernel layers are missing (an
  unprivileged container without user namespaces).

With `evaluate=` (the code-execution reward's assert cases), the program's process runs the
code on a thread of its own, evaluates the expression in its namespace and writes the value's
marshal bytes to a pipe of its own, after a per-run secret (`secrets.token_hex`, written into
the config file, which the bootstrap deletes before the program starts). `Result.value` is
that report only when the pipe held exactly `secret`, a newline and one line of hex; the
exit status alone says nothing about it. rl/sandbox_child.py `_run_case` says why the
program cannot read the secret (the audit hook is part of that, so `evaluate` refuses an
Isolation without it), and rl/code_harness.py parses the report.

Every run also gets a wall-clock limit, RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, no core files,
PR_SET_NO_NEW_PRIVS and a byte cap on stdout and on stderr. The program and everything it
started are killed and reaped on every exit path; with a dedicated uid the parent then checks
that no process of that uid is left (and kills any, as a backstop).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hmac
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace

from rl.sandbox_uids import UIDS, kill_survivors, readable_by_all

_BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


class Status(enum.Enum):
    """How a run ended."""

    OK = "ok"  # exit status 0
    ERROR = "error"  # non-zero exit, uncaught exception or a signal
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    MEMORY = "memory"  # MemoryError under the address-space limit
    OUTPUT_LIMIT = "output_limit"  # stdout or stderr went past max_output_bytes
    SANDBOX_ERROR = "sandbox_error"  # the sandbox itself could not start the program


@dataclass(frozen=True)
class Limits:
    """Per-run limits. memory_bytes is RLIMIT_AS of each process; max_processes (threads
    included) holds with a dedicated uid, elsewhere fork is refused; the cap is per stream."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_bytes: int = 512 << 20
    max_processes: int = 8
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 16 << 20

    def __post_init__(self):
        least = {"wall_s": 1e-3, "cpu_s": 1, "memory_bytes": 64 << 20, "max_processes": 1,
                 "max_output_bytes": 1, "max_file_bytes": 1}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            kind = (int, float) if name == "wall_s" else (int,)
            if type(value) not in kind:
                raise ValueError(f"Limits.{name} must be of type {kind}, got {value!r}")
            if value < low:
                raise ValueError(f"Limits.{name} must be >= {low}, got {value!r}")


@dataclass(frozen=True)
class Result:
    """One run. returncode: negative for a signal, None when nothing could be started."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system time of the program, its children and the bootstrap
    value: str | None = None  # `evaluate` runs: the harness's authenticated report, else None


@dataclass(frozen=True)
class Isolation:
    """Which layers a run uses (see the module docstring). `detect_isolation()` gives the
    strongest set this machine allows; weaker sets are for testing one layer alone."""

    dedicated_uid: bool
    user_namespace: bool
    network_namespace: bool
    read_only_filesystem: bool
    audit_hook: bool = True

    def describe(self) -> str:
        """Which mechanism covers each concern, one line each."""
        hook = " + audit hook" if self.audit_hook else ""
        uid = " + uid permissions" if self.dedicated_uid else ""
        net = "network namespace" if self.network_namespace else "host network"
        files = "read-only mount namespace" if self.read_only_filesystem else "host mounts"
        procs = "fork refused by the audit hook" if self.audit_hook else "unbounded"
        procs = "RLIMIT_NPROC + killed by uid" if self.dedicated_uid else procs
        who = "a dedicated uid" if self.dedicated_uid else f"the parent's uid {os.geteuid()}"
        return (f"runs as: {who}\nnetwork: {net}{hook}\nfilesystem: {files}{uid}{hook}\n"
                f"processes: {procs}")  # fmt: skip


@functools.cache
def detect_isolation() -> Isolation:
    """Probe once (a short child process) which layers this machine allows."""
    root = os.geteuid() == 0
    wanted = Isolation(root, not root, True, True)
    with _Workspace(wanted) as space:
        config = space.config(wanted, probe=True)
        done = subprocess.run(space.argv(config), cwd=space.workdir, env=space.env(),
                              capture_output=True, timeout=60, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"sandbox probe failed: {done.stderr.decode(errors='replace')}")
    found = Isolation(**json.loads(done.stdout), audit_hook=True)
    if found.dedicated_uid and not found.read_only_filesystem and not readable_by_all():
        # The uid could not even start Python; the hook and the limits still hold.
        warnings.warn(
            f"sandbox: a dedicated uid cannot read the Python installation at "
            f"{sys.base_prefix} and no mount namespace is available to expose it, so programs "
            "run as the current user (audit hook and limits only); install Python in a "
            "world-readable place to get the uid layer",
            RuntimeWarning,
            stacklevel=2,
        )
        found = replace(found, dedicated_uid=False)
    return found


def run_python(
    code: str,
    stdin: str = "",
    limits: Limits = Limits(),
    isolation: Isolation | None = None,
    *,
    evaluate: str | None = None,
) -> Result:
    """Run `code` as __main__ with `stdin` under `limits`; never raises for what the code does.
    With `evaluate` (a Python expression), also evaluate it in the program's namespace once the
    program has run and report the result as plain data (rl/code_harness.py) in Result.value."""
    if not all(isinstance(x, str) for x in (code, stdin, "" if evaluate is None else evaluate)):
        raise TypeError(f"code, stdin and evaluate must be str, got {code!r:.40}, "
                        f"{stdin!r:.40}, {evaluate!r:.40}")  # fmt: skip
    isolation = detect_isolation() if isolation is None else isolation
    if evaluate is not None and not isolation.audit_hook:
        raise ValueError("run_python(evaluate=...) needs Isolation.audit_hook: without it the "
                         "program can reach the report's secret (sys._current_frames)")  # fmt: skip
    started = time.monotonic()
    try:
        with _Workspace(isolation) as space:
            config = space.config(isolation, code, limits, evaluate=evaluate)
            return _execute(space, config, stdin, limits, started)
    except Exception as error:  # the machinery failed (fork, disk), not the program
        return Result(Status.SANDBOX_ERROR, None, "", f"sandbox: {error!r}",
                      time.monotonic() - started, 0.0)  # fmt: skip


# ---- machinery --------------------------------------------------------------------------------


class _Workspace:
    """Temporary base dir (root's, holds config and the Python mount point) with the work dir
    inside (the program's); a claimed uid; all removed or released on exit."""

    def __init__(self, isolation: Isolation):
        self.isolation = isolation
        self.base = tempfile.mkdtemp(prefix="jaxseek-sandbox-")
        self.workdir = os.path.join(self.base, "work")
        self.uid = None
        self.python_mount = None

    def __enter__(self) -> _Workspace:
        try:
            os.chmod(self.base, 0o711)
            os.mkdir(self.workdir, 0o700)
            if self.isolation.dedicated_uid:
                self.uid = UIDS.claim()
                os.chown(self.workdir, self.uid, self.uid)
                if self.isolation.read_only_filesystem and not readable_by_all():
                    self.python_mount = [sys.base_prefix, os.path.join(self.base, "python")]
                    os.mkdir(self.python_mount[1], 0o755)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        survivors = kill_survivors(self.uid) if self.uid is not None else []
        if os.geteuid() != 0:  # the program may have left directories it cannot write
            for path, dirs, _ in os.walk(self.workdir):
                for name in dirs:
                    with contextlib.suppress(OSError):
                        if not os.path.islink(os.path.join(path, name)):
                            os.chmod(os.path.join(path, name), 0o700)
        shutil.rmtree(self.base, ignore_errors=True)
        if self.uid is not None and not survivors:  # a uid with survivors is never reused
            UIDS.release(self.uid)

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "HOME": self.workdir, "TMPDIR": self.workdir}  # fmt: skip

    def argv(self, config: dict) -> list[str]:
        path = os.path.join(self.base, "config.json")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            json.dump(config, file)
        return [sys.executable, "-I", "-S", "-B", "-X", "utf8", _BOOTSTRAP, path]

    def config(self, iso: Isolation, code="", limits=None, *, probe=False, evaluate=None):
        secret = secrets.token_hex(32) if evaluate is not None else None
        return dict(probe=probe, source=code, workdir=self.workdir, uid=self.uid, report_fd=-1,
                    evaluate=evaluate, secret=secret, result_fd=-1,
                    dedicated_uid=iso.dedicated_uid, user_namespace=iso.user_namespace,
                    network_namespace=iso.network_namespace, audit_hook=iso.audit_hook,
                    read_only_filesystem=iso.read_only_filesystem,
                    python_mount=self.python_mount, host_netns=os.stat("/proc/self/ns/net").st_ino,
                    limits=None if limits is None else vars(limits))  # fmt: skip


def _execute(space: _Workspace, config: dict, stdin: str, limits: Limits, started: float):
    pipes = {"report_fd": os.pipe()}
    if config["evaluate"] is not None:
        pipes["result_fd"] = os.pipe()
    config.update((name, write) for name, (_, write) in pipes.items())
    try:
        proc = subprocess.Popen(space.argv(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=space.workdir, env=space.env(),
                                start_new_session=True,
                                pass_fds=[write for _, write in pipes.values()])  # fmt: skip
    except BaseException:
        for read, _ in pipes.values():
            os.close(read)
        raise
    finally:
        for _, write in pipes.values():
            os.close(write)
    result_fd = pipes["result_fd"][0] if "result_fd" in pipes else None
    streams = _Streams(proc, pipes["report_fd"][0], result_fd, limits.max_output_bytes)
    try:
        why = streams.pump(stdin.encode(), started + limits.wall_s)
    finally:
        _stop(proc)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            streams.close()
    cpu = usage.ru_utime + usage.ru_stime
    out, err = (bytes(b).decode(errors="replace") for b in streams.output)
    report = streams.report.decode(errors="replace").split()
    exited = report[1:2] == ["exit"]
    code = os.waitstatus_to_exitcode(int(report[2])) if exited else proc.returncode
    if report[:1] != ["ready"]:
        status = Status.SANDBOX_ERROR
    elif why is not None:
        status = why
    elif code == 0:
        status = Status.OK
    elif code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu >= limits.cpu_s):
        status = Status.TIMEOUT
    elif err.rstrip().rpartition("\n")[2].startswith("MemoryError"):
        status = Status.MEMORY
    else:
        status = Status.ERROR
    value = None
    if result_fd is not None and len(streams.result) < limits.max_output_bytes:  # not cut short
        value = _authenticated(streams.result, config["secret"])
    return Result(status, code, out, err, time.monotonic() - started, cpu, value)


def _authenticated(data: bytes, secret: str) -> str | None:
    """What the harness reported when the result pipe held exactly its one record, `secret`
    newline report (one line of ASCII); None for anything else the program made of it."""
    head, newline, report = bytes(data).partition(b"\n")
    if not (newline and hmac.compare_digest(head, secret.encode())):
        return None
    return report.decode() if report and report.isascii() and b"\n" not in report else None


def _stop(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """Ask the supervisor to kill the program and reap it all (SIGTERM); SIGKILL the
    supervisor's group if it has not exited after `grace_s`. The supervisor is unreaped until
    the caller's wait4, so its pid cannot have been reused."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    give_up = time.monotonic() + grace_s
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > give_up:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.002)


class _Streams:
    """Feeds stdin and reads stdout, stderr, the report pipe and the result pipe without
    blocking."""

    def __init__(self, proc: subprocess.Popen, report_fd: int, result_fd: int | None, cap: int):
        self.proc, self.cap = proc, cap
        self.output = (bytearray(), bytearray())
        self.report = b""  # "ready" from the program, then "exit <wait status>" from the supervisor
        self.result = bytearray()  # the harness's record (evaluate runs), capped like the output
        self.buffers = {proc.stdout.fileno(): self.output[0], proc.stderr.fileno(): self.output[1],
                        report_fd: None}  # fmt: skip
        self.pipes = [report_fd]  # the two this class owns and closes
        if result_fd is not None:
            self.buffers[result_fd] = self.result
            self.pipes.append(result_fd)

    def pump(self, data: bytes, deadline: float) -> Status | None:
        """Until the supervisor has exited and the pipes closed: None, or why it was cut short."""
        proc, selector = self.proc, selectors.DefaultSelector()
        outs = (proc.stdout.fileno(), proc.stderr.fileno())
        for fd in self.buffers:
            selector.register(fd, selectors.EVENT_READ)
        try:
            pidfd = os.pidfd_open(proc.pid)
            selector.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):  # Linux < 5.3: poll with waitid(WNOWAIT)
            pidfd = None
        stdin_fd, sent = proc.stdin.fileno(), 0
        os.set_blocking(stdin_fd, False)
        if data:
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        exited = False
        try:
            while not exited or any(fd in selector.get_map() for fd in outs):
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return Status.TIMEOUT
                events = selector.select(timeout if pidfd is not None else min(timeout, 0.01))
                for key, _ in events:
                    if key.fd == pidfd:
                        selector.unregister(pidfd)
                        exited = True
                    elif key.fd == stdin_fd:
                        try:
                            sent += os.write(stdin_fd, data[sent : sent + 65536])
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:  # the program closed stdin or exited
                            sent = len(data)
                        if sent >= len(data):
                            selector.unregister(stdin_fd)
                            proc.stdin.close()
                    elif not self._read(key.fd, selector):
                        return Status.OUTPUT_LIMIT
                if pidfd is None and not exited:
                    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
                    exited = os.waitid(os.P_PID, proc.pid, flags) is not None
            return None
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)

    def _read(self, fd: int, selector) -> bool:
        """Read what is there; False once a capped stream passed the cap."""
        chunk = os.read(fd, 65536)
        if not chunk:
            selector.unregister(fd)
        elif (buffer := self.buffers[fd]) is None:
            self.report += chunk
        else:
            buffer += chunk
            if len(buffer) > self.cap:
                del buffer[self.cap :]
                return False
        return True

    def close(self) -> None:
        """Keep what the (now dead) processes left in the pipes, then close them."""
        for fd, buffer in self.buffers.items():
            os.set_blocking(fd, False)
            try:
                while (buffer is None or len(buffer) < self.cap) and (chunk := os.read(fd, 65536)):
                    if buffer is None:
                        self.report += chunk
                    else:
                        buffer += chunk[: self.cap - len(buffer)]
            except OSError:
                pass
        for file in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            file.close()
        for fd in self.pipes:
            os.close(fd)
