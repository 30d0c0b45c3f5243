"""The in-sandbox half of rl/sandbox.py: the bootstrap that `python -I -S -B` runs as a script.

Started as the parent's uid with the path of a JSON config (which it deletes at once: it holds
the run's secret), it enters the namespaces asked for, then forks the program (which drops
privileges, sets its limits and the audit hook and runs the code as __main__) and stays as its
supervisor. For an `evaluate` run the program's process runs the code on a second thread and
then reports the expression's value under the secret (`_run_case`). Under -I -S neither this
file's directory nor site-packages is on sys.path, so it imports only the standard library;
rl/sandbox.py imports `_kill_all_of` from it for its own cleanup.
"""

from __future__ import annotations

import _queue
import _thread
import builtins
import collections
import contextlib
import ctypes
import functools
import itertools
import json
import linecache
import marshal
import operator
import os
import re
import resource
import signal
import sys
import threading
import traceback
import types

_SETUP_FAILED = 125
_REPORT_VERSION = 2  # marshal's; rl/code_harness.py parses exactly this format
_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 1, 4, 38, 36


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns")]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


class _Libc:
    """The Linux calls Python 3.11's os module lacks; each raises OSError on failure."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _call(self, name: str, *args) -> None:
        if getattr(self._libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{name}: {os.strerror(errno)}")

    def unshare(self, flags: int) -> None:
        self._call("unshare", ctypes.c_int(flags))

    def mount(self, source: str | None, target: str, flags: int) -> None:
        src = None if source is None else os.fsencode(source)
        self._call("mount", src, os.fsencode(target), None, ctypes.c_ulong(flags), None)

    def mount_setattr(self, path: str, recursive: bool, set_: int = 0, clear: int = 0) -> None:
        attr, long = _MountAttr(set_, clear, 0, 0), ctypes.c_long
        self._call("syscall", long(_SYS_MOUNT_SETATTR), long(_AT_FDCWD), os.fsencode(path),
                   long(_AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                   long(ctypes.sizeof(attr)))  # fmt: skip

    def prctl(self, option: int, value: int) -> None:
        zero = ctypes.c_ulong(0)
        self._call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero)

    def drop_capabilities(self) -> None:
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
        self._call("capset", ctypes.byref(header), data)


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _user_namespace(cfg: dict, libc: _Libc) -> None:
    uid, gid = os.getuid(), os.getgid()
    libc.unshare(_CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _network_namespace(cfg: dict, libc: _Libc) -> None:
    libc.unshare(_CLONE_NEWNET | _CLONE_NEWIPC)
    if os.stat("/proc/self/ns/net").st_ino == cfg["host_netns"]:
        raise OSError("still in the host's network namespace")


def _read_only_filesystem(cfg: dict, libc: _Libc) -> None:
    workdir = cfg["workdir"]
    libc.unshare(_CLONE_NEWNS)
    libc.mount(None, "/", _MS_REC | _MS_PRIVATE)
    libc.mount(workdir, workdir, _MS_BIND)
    if cfg["python_mount"]:
        libc.mount(*cfg["python_mount"], _MS_BIND | _MS_REC)
    libc.mount_setattr("/", True, set_=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID)
    libc.mount_setattr(workdir, False, clear=_MOUNT_ATTR_RDONLY)
    os.chdir(workdir)  # the old cwd is the directory under the bind mount, read-only now
    if not os.statvfs("/").f_flag & os.ST_RDONLY or os.statvfs(".").f_flag & os.ST_RDONLY:
        raise OSError("the read-only remount did not take")
    if cfg["python_mount"]:
        _follow_python(*cfg["python_mount"])


def _dedicated_uid(cfg: dict, libc: _Libc) -> None:
    uid = cfg["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _enter(cfg: dict, libc: _Libc, *layers) -> dict[str, bool]:
    """Enter each requested layer; when probing, record which fail instead of raising."""
    done = {}
    for layer in layers:
        name = layer.__name__.lstrip("_")
        done[name] = False
        if cfg[name]:
            try:
                layer(cfg, libc)
                done[name] = True
            except OSError:
                if not cfg["probe"]:
                    raise
    return done


def _follow_python(old: str, new: str) -> None:
    """Point the import system at the bind-mounted copy of the Python installation."""
    move = lambda p: new + p[len(old) :] if p == old or p.startswith(old + os.sep) else p
    sys.path[:] = [move(p) for p in sys.path]
    for module in list(sys.modules.values()):
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = [move(p) for p in module.__path__]
    sys.path_importer_cache.clear()


def _apply_limits(limits: dict, processes: bool, harness_thread: bool = False) -> None:
    def lower(kind: int, soft: int, hard: int) -> None:
        current = resource.getrlimit(kind)[1]
        hard = hard if current == resource.RLIM_INFINITY else min(hard, current)
        resource.setrlimit(kind, (min(soft, hard), hard))

    lower(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)
    lower(resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"])
    lower(resource.RLIMIT_FSIZE, limits["max_file_bytes"], limits["max_file_bytes"])
    lower(resource.RLIMIT_CORE, 0, 0)
    if processes:  # the harness's own thread does not count against the program
        most = limits["max_processes"] + harness_thread
        lower(resource.RLIMIT_NPROC, most, most)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_REFUSED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty", "pty.spawn",
            "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "gc.get_objects",
            "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New",
            # other threads' frames, and hooks that run in them: the way to the harness's thread
            "sys._current_frames", "sys._current_exceptions", "sys._settraceallthreads",
            "sys._setprofileallthreads", "sys.addaudithook",
            "sys.monitoring.register_callback"}  # fmt: skip
_REFUSED_IMPORTS = {"_ctypes", "_posixsubprocess"}  # and CPython's _test* and _xx* modules
# event -> (argument positions holding paths to keep inside, positions holding a dir_fd)
_PATH_EVENTS = {"os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.link": ((0, 1), (2, 3)),
                "os.mkdir": ((0,), (2,)), "os.remove": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
                "os.rmdir": ((0,), (1,)), "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()),
                "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
                "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
                "shutil.rmtree": ((0,), (1,))}  # fmt: skip


def _audit_hook(workdir: str, allow_fork: bool, sealed: tuple[int, int] | None = None):
    """The PEP 578 hook: raises PermissionError for what the program may not do. `sealed` is
    the (st_dev, st_ino) of a pipe the program may not reopen (through /proc/self/fd)."""
    root = os.path.realpath(workdir)
    other_process = re.compile(r"/proc/(\d+)(/|$)")
    # bound now: the checks that keep the secret must not run Python the program can patch
    stat, kind, number, default_unraisable = os.stat, type, int, sys.__unraisablehook__
    unstattable, proc = (OSError, ValueError, TypeError), os.stat("/proc").st_dev

    def guarded(path: object) -> str | None:
        """Why `path` may not be opened at all in an evaluate run: the result pipe, memory
        (the only mode-0600 files of a /proc/<pid>), a /proc directory (for a dir_fd into
        one). By os.stat alone, no realpath or builtins, so that patching neither helps."""
        try:
            found = stat(path)
        except unstattable:
            return None
        if (found.st_dev, found.st_ino) == sealed:
            return "of the result pipe"
        if found.st_dev == proc and found.st_mode & 0o170777 == 0o100600:
            return "of a process's memory"
        if found.st_dev == proc and found.st_mode & 0o170000 == 0o040000:
            return "of a /proc directory"
        return None

    def refuse(event: str, detail: object = "") -> None:
        raise PermissionError(f"sandbox refused {event} {detail}".rstrip())

    def outside(path: object) -> str | None:
        real = os.path.realpath(os.fsdecode(path))
        return None if real == root or real.startswith(root + os.sep) else real

    def hook(event: str, args: tuple) -> None:
        if event == "sys.unraisablehook" and args[0] is not default_unraisable:
            refuse(event, "other than the default")  # it would be handed the harness's objects
        if event == "open":
            path, mode, flags = args
            if sealed is not None and kind(path) is not number and (why := guarded(path)):
                refuse(event, why)
            if isinstance(path, int) or (real := outside(path)) is None:
                return
            writes = isinstance(flags, int) and flags & _WRITE_FLAGS
            if writes or (isinstance(mode, str) and set(mode) & set("wax+")):
                refuse(event, f"for writing outside the work directory: {real}")
            if os.path.isdir(real):
                refuse(event, f"of a directory outside the work directory: {real}")
            if (match := other_process.match(real)) and int(match[1]) != os.getpid():
                refuse(event, f"of another process's /proc entry: {real}")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            for i in paths:
                if i >= len(args) or (isinstance(args[i], int) and event == "os.truncate"):
                    continue  # ftruncate needs a descriptor opened for writing: checked then
                if isinstance(args[i], int) or outside(args[i]) is not None:
                    refuse(event, f"outside the work directory: {args[i]!r}")
            if any(i < len(args) and args[i] not in (None, -1, _AT_FDCWD) for i in dir_fds):
                refuse(event, "with dir_fd")
        elif (event in _REFUSED or event.startswith(("socket.", "ctypes."))
              or (event == "os.fork" and not allow_fork)
              or (event == "import" and (args[0] in _REFUSED_IMPORTS
                                         or args[0].startswith(("_test", "_xx"))))):  # fmt: skip
            refuse(event, args[0] if event == "import" else "")

    return hook


def _child_main(config_path: str) -> None:
    """Bootstrap, as the parent's uid: enter the namespaces, then fork the program and stay
    as its supervisor."""
    with open(config_path, encoding="utf-8") as file:
        cfg = json.load(file)
    libc = _Libc()
    try:
        os.unlink(config_path)  # it holds the run's secret, and the program may share this uid
        vault = [cfg.pop("secret").encode()] if cfg["evaluate"] is not None else None
        done = _enter(cfg, libc, _user_namespace, _network_namespace, _read_only_filesystem)
        if cfg["probe"]:
            print(json.dumps(done | _enter(cfg, libc, _dedicated_uid)))
            return
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the program come here to be reaped
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    except Exception as error:
        _setup_failed(error)
    supervisor = os.getpid()
    if (program := os.fork()) != 0:
        if cfg["result_fd"] >= 0:
            os.close(cfg["result_fd"])  # the program's alone: it reaches the parent untouched
        _supervise(program, cfg["uid"] if cfg["dedicated_uid"] else None, cfg["report_fd"])
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _enter(cfg, libc, _dedicated_uid)
        if cfg["user_namespace"] and not cfg["dedicated_uid"]:
            libc.drop_capabilities()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        if os.getppid() != supervisor:
            os._exit(_SETUP_FAILED)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
        if cfg["evaluate"] is not None:  # /proc/self/mem and /proc/self/fd become root's
            libc.prctl(_PR_SET_DUMPABLE, 0)
        _apply_limits(cfg["limits"], cfg["dedicated_uid"], cfg["evaluate"] is not None)
        if cfg["audit_hook"]:
            sealed = None
            if cfg["result_fd"] >= 0:
                pipe = os.fstat(cfg["result_fd"])
                sealed = (pipe.st_dev, pipe.st_ino)
            sys.addaudithook(_audit_hook(cfg["workdir"], cfg["dedicated_uid"], sealed))
    except Exception as error:
        _setup_failed(error)
    for name in ("subprocess", "_posixsubprocess", "ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)  # so that a new import meets the hook
        globals().pop(name, None)
    os.write(cfg["report_fd"], b"ready")
    os.close(cfg["report_fd"])
    if cfg["evaluate"] is None:
        _run_program(cfg["source"])
    else:
        _run_case(cfg["source"], cfg["evaluate"], vault, cfg["result_fd"])


def _setup_failed(error: Exception):
    sys.stderr.write(f"sandbox setup failed: {error!r}\n")
    sys.stderr.flush()
    os._exit(_SETUP_FAILED)


def _supervise(program: int, uid: int | None, report_fd: int):
    """Reap the program and all it leaves behind (this process is their subreaper, so they
    become its children); on SIGTERM, or once the program has exited, kill all of it (by uid,
    and every child of this process: unreaped, so their pids cannot have been reused); report
    the program's wait status; exit when nothing is left."""
    stopping, running = False, True

    def stop(*_) -> None:
        nonlocal stopping
        with contextlib.suppress(OSError):
            if not stopping and uid is not None:
                _kill_all_of(uid)
        stopping = True
        for pid in _children() | ({program} if running else set()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == program:
            running = False
            with contextlib.suppress(OSError):
                os.write(report_fd, f" exit {status}".encode())
        if pid == program or stopping:
            stop()


def _kill_all_of(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) from a forked helper of that uid is atomic with
    respect to fork, reaches processes that left the session and needs nothing on disk."""
    if uid <= 0:
        raise ValueError(f"refusing to kill every process of uid {uid}")
    if (helper := os.fork()) == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() == (uid, uid, uid):  # as anyone else, kill(-1) hits the host
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _children() -> set[int]:
    """This (single-threaded) process's children; empty where the kernel does not list them."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as file:
            return set(map(int, file.read().split()))
    except OSError:
        return set()


def _main_module(source: str) -> dict:
    """The namespace of a fresh __main__, as `python main.py` would run the program."""
    main = types.ModuleType("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"], sys.argv = main, ["main.py"]
    builtins.exit = builtins.quit = sys.exit  # site is not imported under -S
    linecache.cache["main.py"] = (len(source), None, source.splitlines(True), "main.py")
    return main.__dict__


def _case_thread(program, case, namespace: dict, put, with_sentinel: bool):
    """The program's thread: runs `program`, evaluates `case` and `put`s the marshal bytes of
    the case's value, after (`with_sentinel`, Python < 3.13) the thread's sentinel lock,
    released when the thread ends. Built of C callables only (partial, map, islice, chain,
    marshal.dumps, SimpleQueue.put), so no Python frame of the harness is on the program's
    stack (its frames' f_back ends at its own module) and no object of the harness in reach."""
    values = itertools.islice(map(eval, (program, case), (namespace, namespace)), 1, None)
    steps = [map(put, map(marshal.dumps, values, itertools.repeat(_REPORT_VERSION)))]
    if with_sentinel:  # it comes unlocked (threading.Thread locks its own): lock it here
        sentinel, handed_over = itertools.tee(itertools.starmap(_thread._set_sentinel, [()]))
        steps[:0] = [map(operator.methodcaller("acquire"), sentinel), map(put, handed_over)]
    return functools.partial(collections.deque(maxlen=0).extend, itertools.chain(*steps))


def _run_case(source: str, expression: str, vault: list, result_fd: int):
    """Run the program and evaluate `expression` on a thread of their own (_case_thread),
    then write `secret`, a newline and the hex of the value's marshal bytes to `result_fd`,
    and exit.

    The secret is in this thread's frames, which the program cannot reach: its own thread
    holds no frame or object of the harness, and what would reach into this thread is
    refused by the audit hook (sys._current_frames, tracing all threads, new audit hooks, a
    custom unraisable hook, which would be handed the runner, gc, /proc/self/mem, reopening
    the result pipe, _testcapi) or impossible off the main thread (signal handlers); the
    config file is gone before the program starts. Nor does the program's code run here:
    after the program starts, this thread runs only the lines below on locals bound before
    (no global or builtin lookup), allocating nothing (so no garbage collection runs a
    finalizer here) and raising nothing until the secret has left `vault`, and no Python
    signal handler is left to run.
    """
    try:
        program = compile(source, "main.py", "exec")
        case = compile(expression, "<case>", "eval")
    except (SyntaxError, ValueError) as error:
        traceback.print_exception(error)
        sys.exit(1)
    namespace = _main_module(source)
    for signum in signal.valid_signals():
        if callable(signal.getsignal(signum)):  # SIGINT's KeyboardInterrupt, in practice
            signal.signal(signum, signal.SIG_DFL)
    # threading makes whichever thread first imports it its main thread and takes that
    # thread's sentinel: let that be this one, not the program's
    threading.main_thread()
    queue, joinable = _queue.SimpleQueue(), hasattr(_thread, "start_joinable_thread")
    runner = _case_thread(program, case, namespace, queue.put, with_sentinel=not joinable)
    write, exit_, out, err = os.write, os._exit, sys.stdout, sys.stderr
    try:  # the program runs from about now
        if joinable:  # Python >= 3.13, which has no _set_sentinel
            _thread.start_joinable_thread(runner).join()
        else:
            _thread.start_new_thread(runner, ())
            queue.get().acquire()  # the sentinel: until the program's thread has ended
    except RuntimeError as error:  # no thread to be had (memory, RLIMIT_NPROC)
        _setup_failed(error)
    status = 1
    try:
        if not queue.empty():
            write(result_fd, vault.pop())  # shorter than PIPE_BUF: one atomic write
            rest = b"\n" + queue.get().hex().encode()
            while rest:
                rest = rest[write(result_fd, rest) :]
            status = 0
    finally:
        vault.clear()
        for stream in (out, err):  # the program's buffered output, for the parent's Result
            with contextlib.suppress(BaseException):  # a program's stream may be anything
                stream.flush()
        if status:
            with contextlib.suppress(OSError):
                write(2, b"sandbox: no result for the case (the program raised or exited "
                         b"before it, or its value is not plain data)\n")  # fmt: skip
        exit_(status)


def _run_program(source: str) -> None:
    namespace = _main_module(source)
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as error:
        traceback.print_exception(error.with_traceback(error.__traceback__.tb_next))
        sys.exit(1)


if __name__ == "__main__":
    _child_main(sys.argv[1])
