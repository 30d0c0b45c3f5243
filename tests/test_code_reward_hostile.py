"""Programs that try to score without being right, against the code-execution reward (issue 13).

Each trick is a wrong `add` (it returns a - b) plus a way to fake a pass that works, or would
work, against a weaker harness: one that trusts the exit status, compares inside the sandbox,
accepts an unauthenticated or a second report, serialises with patchable code, or leaves its
secret where the program can read it. Each must score exactly 0 on `assert add(2, 3) == 5`
(and on the stdin/stdout twin where there is one), while honest programs score 1 and partly
right ones the right fraction. tests/test_sandbox.py holds the isolation suite.
"""

from __future__ import annotations

import dataclasses
import marshal
import textwrap

import pytest

from rl.code_harness import decode, encode, equal
from rl.code_reward import AssertCase, Check, make_code_execution, to_cases
from rl.sandbox import Isolation, Limits, detect_isolation, run_python

LIMITS = Limits(wall_s=3.0, cpu_s=2, memory_bytes=256 << 20, max_output_bytes=1 << 16)
reward = make_code_execution(LIMITS, workers=4)
WRONG = "def add(a, b):\n    return a - b\n"
ASSERT = "assert add(2, 3) == 5"
IO = {"input": "2 3", "output": "5"}
FIVE = marshal.dumps(5, 2).hex()  # what the harness would report for a right answer


# find the secret in the process's memory, forge one report of 5 with it, exit before the harness
MEM_THEFT = """
import os, re
{patch}
def memory():
    try:
        return open("/proc/self/mem", "rb")
    except OSError as error:
        print("NO", error)
    try:
        return os.fdopen(os.open("mem", os.O_RDONLY, dir_fd=os.open("/proc/self", 0)), "rb")
    except OSError as error:
        print("NO", error)
found, mem = set(), memory()
for line in open("/proc/self/maps") if mem else ():
    span, perms = line.split()[:2]
    if perms.startswith("r") and "[v" not in line:
        low, high = (int(x, 16) for x in span.split("-"))
        try:
            mem.seek(low)
            found |= set(re.findall(rb"[0-9a-f]{{64}}", mem.read(high - low)))
        except (OSError, OverflowError, ValueError):
            pass
for secret in sorted(found)[:1]:
    for fd in range(3, 64):
        try:
            os.write(fd, secret + b"\\n{five}")
        except OSError:
            pass
    os._exit(0)
"""


PATCHED_HOOK_CHECKS = """
import builtins, posixpath
builtins.isinstance = lambda *a: True  # what the audit hook's path checks call
posixpath.realpath = lambda path, **k: os.getcwd() + "/inside"
"""


def wrong(code: str) -> str:
    """The wrong add, then `code`."""
    return WRONG + textwrap.dedent(code)


# name -> program; each defines a wrong add and tries to pass `assert add(2, 3) == 5` anyway
ASSERT_TRICKS = {
    # the exit status: the asserts used to be appended after the program
    "sys.exit(0) at the end": WRONG + "import sys\nsys.exit(0)\n",
    "os._exit(0) at the end": WRONG + "import os\nos._exit(0)\n",
    "atexit calls os._exit(0)": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "threading.Timer calls os._exit(0)": """
        import os, threading, time
        threading.Timer(0.05, os._exit, (0,)).start()
        def add(a, b):
            time.sleep(1)
            return a - b
        """,
    "close every fd, then os._exit(0)": wrong("import os\nos.closerange(0, 1 << 16)\nos._exit(0)"),
    "close every fd but stdio, then return": WRONG + "import os\nos.closerange(3, 1 << 16)\n",
    "raise SystemExit(0) inside add": "def add(a, b):\n    raise SystemExit(0)\n",
    "raise KeyboardInterrupt inside add": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "raise GeneratorExit inside add": "def add(a, b):\n    raise GeneratorExit\n",
    # a comparison inside the sandbox, or == on the program's own objects in the parent
    "int subclass whose __eq__ is always True": """
        class Yes(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return Yes(a - b)
        """,
    "str subclass whose __eq__ is always True": """
        class Yes(str):
            __eq__ = lambda self, other: True
            __hash__ = str.__hash__
        def add(a, b):
            return Yes("no")
        """,
    "dict subclass whose __eq__ is always True": """
        class Yes(dict):
            __eq__ = lambda self, other: True
        def add(a, b):
            return Yes()
        """,
    "__class__ spoofed as int, __eq__ always True": """
        class Fake:
            __class__ = property(lambda self: int)
            __eq__ = lambda self, other: True
            __hash__ = lambda self: 5
        def add(a, b):
            return Fake()
        """,
    "metaclass whose __eq__ says it is every type": """
        class Meta(type):
            __eq__ = lambda cls, other: True
            __hash__ = lambda cls: hash(int)
        class Any(metaclass=Meta):
            __eq__ = lambda self, other: True
        def add(a, b):
            return Any()
        """,
    "NaN": "def add(a, b):\n    return float('nan')\n",
    "True for a number": "def add(a, b):\n    return True\n",
    "a list for a tuple, a str for an int": "def add(a, b):\n    return ['5']\n",
    # a serialiser or comparison the program can patch
    "builtins patched (eval, type, isinstance, repr, str, print)": wrong("""
        import builtins
        builtins.eval = lambda *a, **k: 5
        builtins.type = lambda *a: int
        builtins.isinstance = lambda *a: True
        builtins.repr = builtins.str = lambda o: "5"
        builtins.print = lambda *a, **k: None
        """),
    "json, marshal and pickle patched to write a 5": wrong("""
        import json, marshal, pickle
        five = marshal.dumps(5, 2)
        json.dumps = lambda *a, **k: "5"
        marshal.dumps = lambda *a, **k: five
        pickle.dumps = lambda *a, **k: pickle._dumps(5)
        """),
    "the harness patched through sys.modules": wrong(f"""
        import sys
        for module in list(sys.modules.values()):
            for name in ("run_case", "encode", "_case_thread", "_run_case", "dumps", "equal"):
                if hasattr(module, name):
                    try:
                        setattr(module, name, lambda *a, **k: bytes.fromhex("{FIVE}"))
                    except (AttributeError, TypeError):
                        pass
        """),
    "the harness patched through frames and gc": """
        import gc, sys
        def add(a, b):
            frame, found = sys._getframe(0), []
            while frame is not None:  # whatever called add: the harness, if it is there
                found.append(frame)
                frame = frame.f_back
            for frame in found:
                for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
                    if isinstance(value, list) and value != [] and frame.f_code.co_name != "add":
                        value[:] = [5] * len(value)  # a result box, a secret vault
            try:
                for obj in gc.get_objects():
                    if isinstance(obj, dict) and "secret" in obj:
                        print("SECRET", obj["secret"])
            except PermissionError:
                pass
            return a - b
        """,
    "the expected value looked up in the config, argv and memory": wrong("""
        import os, re, sys
        text = " ".join(sys.orig_argv + sys.argv + list(os.environ.values()))
        for path in [a for a in sys.orig_argv if a.endswith(".json")] + ["../config.json"]:
            try:
                text += open(path).read()
            except OSError:
                pass
        found = re.findall(r"==\\s*(-?\\d+)", text)
        if found:  # the expected value was sent along: answer it
            add = lambda a, b, _v=int(found[0]): _v
        """),
    "the expected value read from the calling code's constants": """
        import sys
        def add(a, b):  # if the test's expected side were evaluated here, it would be in there
            numbers = [c for c in sys._getframe(1).f_code.co_consts if type(c) is int]
            return numbers[-1] if numbers else a - b
        """,
    # a report channel the program can write to
    "fake success lines on stdout and stderr": wrong(f"""
        import sys
        for line in ("ok", "PASS", "True", "5", "{FIVE}", "result 5", "1 passed"):
            print(line)
            print(line, file=sys.stderr)
        """),
    "one forged report written to every fd, then os._exit(0)": wrong(f"""
        import os
        for fd in range(3, 1024):
            try:
                os.write(fd, b"0" * 64 + b"\\n{FIVE}")  # the format, with a guessed secret
            except OSError:
                pass
        os._exit(0)
        """),
    "junk and fake lines written to every fd": wrong(f"""
        import os
        for fd in range(3, 1024):
            for record in (b"5", b"ready exit 0", b"{FIVE}", b"ok"):
                try:
                    os.write(fd, record + b"\\n")
                except OSError:
                    pass
        """),
    "many fake reports sprayed at every fd": wrong("""
        import marshal, os
        for fd in range(3, 256):
            for n in range(-20, 21):
                try:
                    os.write(fd, marshal.dumps(n, 2).hex().encode() + b"\\n")
                except OSError:
                    pass
        """),
    "files written where a harness might read results": wrong(f"""
        for name in ("result", "result.json", "report", "config.json", ".pass", "out.txt"):
            open(name, "w").write("{FIVE}\\n5\\nok\\n")
        """),
    # stealing the secret, then forging one report with it
    "secret read by reopening the result pipe through /proc/self/fd": wrong(f"""
        import os, re, threading, time
        readers = []
        for fd in range(3, 64):
            try:
                readers.append(os.open(f"/proc/self/fd/{{fd}}", os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
        def steal():
            for _ in range(4000):
                for r in readers:
                    try:
                        got = os.read(r, 4096)
                    except OSError:
                        continue
                    if m := re.match(rb"([0-9a-f]{{64}})\\n", got):
                        for fd in range(3, 64):
                            try:
                                os.write(fd, m[1] + b"\\n{FIVE}")
                            except OSError:
                                pass
                        os._exit(0)
                time.sleep(0.0005)
        threading.Thread(target=steal).start()
        """),
    "secret read from the config file the bootstrap was given": f"""
        import json, os, sys
        for path in [a for a in sys.orig_argv if a.endswith(".json")] + ["../config.json"]:
            try:
                secret = json.load(open(path))["secret"].encode()
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            for fd in range(3, 64):
                try:
                    os.write(fd, secret + b"\\n{FIVE}")
                except OSError:
                    pass
            os._exit(0)
        def add(a, b):
            return a - b
        """,
    "secret read from /proc/self/mem": wrong(MEM_THEFT.format(patch="", five=FIVE)),
    "the hook's path checks patched, then /proc/self/mem or a dir_fd into /proc": wrong(
        MEM_THEFT.format(five=FIVE, patch=PATCHED_HOOK_CHECKS)
    ),
    "the secret taken from the harness thread's frames (sys._current_frames)": f"""
        import os, sys
        def add(a, b):
            try:
                frames = list(sys._current_frames().values())
            except PermissionError:
                frames = []
            for frame in frames:
                while frame is not None:
                    for value in list(frame.f_locals.values()):
                        if type(value) is list and value and type(value[0]) is bytes:
                            for fd in range(3, 64):
                                try:
                                    os.write(fd, value[0] + b"\\n{FIVE}")
                                except OSError:
                                    pass
                            os._exit(0)
                    frame = frame.f_back
            return a - b
        """,
    "the harness's queue reached from an unraisable hook": """
        import marshal, sys
        def steal(args):  # handed the object whose call raised: the harness's runner
            todo, seen, kept = [args.object], set(), []
            while todo and len(seen) < 10_000:
                obj = todo.pop()
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                kept.append(obj)  # so that no id is reused while walking
                if getattr(obj, "__name__", "") == "put" and hasattr(obj, "__self__"):
                    obj(marshal.dumps(5, 2))  # a right answer, into the harness's own queue
                    return
                for name in ("func", "args", "__self__"):
                    todo.append(getattr(obj, name, None))
                if type(obj) in (tuple, list):
                    todo.extend(obj)
                try:
                    todo.extend(obj.__reduce__())
                except Exception:
                    pass
        sys.unraisablehook = steal
        def add(a, b):
            raise ValueError("off to the unraisable hook")
        """,
    # the harness's thread, signals and hooks
    "signals: SIGINT, interrupt_main, an alarm handler, pthread_kill": wrong("""
        import _thread, os, signal
        for attempt in (
            lambda: signal.signal(signal.SIGALRM, lambda *a: os._exit(0)),
            lambda: signal.setitimer(signal.ITIMER_REAL, 0.01),
            lambda: _thread.interrupt_main(),
            lambda: signal.pthread_kill(_thread.get_ident(), signal.SIGUSR1),
            lambda: os.kill(os.getpid(), signal.SIGUSR1),
        ):
            try:
                attempt()
            except (PermissionError, ValueError, OSError):
                pass
        """),
    "settrace, setprofile, audit and unraisable hooks": """
        import sys, threading
        def spy(frame, event, arg):  # would see (and could rewrite) the harness's locals
            for name, value in frame.f_locals.items():
                if isinstance(value, list) and value:
                    value[:] = [5]
            return spy
        for install in (sys.settrace, sys.setprofile, threading.settrace,
                        lambda f: sys.addaudithook(lambda *a: f(sys._getframe(1), "", None))):
            try:
                install(spy)
            except PermissionError:
                pass
        sys.unraisablehook = lambda args: print("GOT", args.object)
        def add(a, b):
            return a - b
        """,
    "stack and recursion exhausted right before the report": """
        import sys
        def add(a, b):
            nested = []
            for _ in range(100_000):
                nested = [nested]
            sys.setrecursionlimit(40)
            return nested
        """,
    "a value that contains itself": "def add(a, b):\n    x = [a]\n    return x.append(x) or x\n",
    "sys.stdout and sys.stderr replaced": wrong("""
        import io, sys
        sys.stdout = sys.stderr = io.StringIO()
        sys.__stdout__ = sys.__stderr__ = None
        """),
}

# name -> program for `{"input": "2 3", "output": "5"}`; each prints a wrong answer (or none)
IO_TRICKS = {
    "wrong answer, then sys.exit(0)": "a, b = map(int, input().split())\nprint(a - b)\n"
    "import sys\nsys.exit(0)\n",
    "no answer, os._exit(0)": "import os\nos._exit(0)\n",
    "no answer, atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "fake success lines": "print('ok')\nprint('PASS')\nprint('True')\n",
    "the answer on stderr only": "import sys\na, b = map(int, input().split())\n"
    "print(a + b, file=sys.stderr)\nprint(a - b)\n",
    "stdout closed, then exit 0": "import os\nos.close(1)\nos._exit(0)\n",
    "stdout replaced": "import io, sys\nsys.stdout = io.StringIO()\nprint(5)\n",
    "writes to every fd": "import os\nfor fd in range(3, 256):\n    try:\n"
    "        os.write(fd, b'5\\n')\n    except OSError:\n        pass\n",
}


def r1(program: str) -> str:
    return f"<think>trying</think> <answer>{textwrap.dedent(program)}</answer>"


@pytest.fixture(scope="module")
def trick_scores() -> dict[str, float]:
    """Every trick scored in one batch of the reward (concurrent sandboxes)."""
    names = [f"assert: {n}" for n in ASSERT_TRICKS] + [f"io: {n}" for n in IO_TRICKS]
    programs = [*ASSERT_TRICKS.values(), *IO_TRICKS.values()]
    tests = [[ASSERT]] * len(ASSERT_TRICKS) + [[IO]] * len(IO_TRICKS)
    scores = reward([""] * len(programs), [r1(p) for p in programs], tests=tests)
    return dict(zip(names, scores, strict=True))


SECRET_TRICKS = [
    "secret read from the config file the bootstrap was given",
    "secret read by reopening the result pipe through /proc/self/fd",
    "secret read from /proc/self/mem",
    "the hook's path checks patched, then /proc/self/mem or a dir_fd into /proc",
    "the secret taken from the harness thread's frames (sys._current_frames)",
    "the harness's queue reached from an unraisable hook",
]
HOOK_ONLY = Isolation(False, False, False, False, audit_hook=True)


@pytest.mark.parametrize("name", SECRET_TRICKS)
def test_secret_tricks_score_zero_with_the_audit_hook_alone(name):
    """Under the dedicated uid the kernel keeps /proc/self/mem and /proc/self/fd shut as well;
    with the hook alone (same uid as the parent) it is the hook that does."""
    result = run_python(textwrap.dedent(ASSERT_TRICKS[name]), limits=LIMITS, isolation=HOOK_ONLY,
                        evaluate="add(2, 3)")  # fmt: skip
    assert result.value is None or not AssertCase(ASSERT).accepts(decode(result.value))


def test_a_report_needs_the_audit_hook():
    kernel_only = dataclasses.replace(detect_isolation(), audit_hook=False)
    with pytest.raises(ValueError, match="audit_hook"):
        run_python(WRONG, limits=LIMITS, isolation=kernel_only, evaluate="add(2, 3)")


@pytest.mark.parametrize("mode", ["full", "hook-only"])
def test_the_result_pipe_and_memory_stay_shut(mode):
    program = """
        import os, stat
        def add(a, b):
            for fd in range(3, 64):
                try:
                    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                        continue
                except OSError:  # not open
                    continue
                try:
                    open(f"/proc/self/fd/{fd}", "rb")
                    print("OPENED the pipe at", fd)
                except OSError as error:
                    print("NO", type(error).__name__, error)
            try:
                import _testcapi  # CPython's test hooks into the interpreter
                print("OPENED _testcapi")
            except (ImportError, PermissionError) as error:
                print("NO", type(error).__name__, error)
            for path in ("/proc/self/mem", "/proc/thread-self/mem"):
                try:
                    open(path, "rb")
                    print("OPENED", path)
                except OSError as error:
                    print("NO", type(error).__name__, error)
            return a + b
        """
    isolation = detect_isolation() if mode == "full" else HOOK_ONLY
    result = run_python(textwrap.dedent(program), limits=LIMITS, isolation=isolation,
                        evaluate="add(2, 3)")  # fmt: skip
    assert decode(result.value) == 5, result.stderr
    assert "OPENED" not in result.stdout and result.stdout.count("NO") == 4, result.stdout


def test_at_least_fifteen_distinct_tricks():
    assert len(ASSERT_TRICKS) >= 15 and len(
        set(map(textwrap.dedent, ASSERT_TRICKS.values()))
    ) == len(ASSERT_TRICKS)


@pytest.mark.parametrize("name", ASSERT_TRICKS)
def test_assert_trick_scores_zero(name, trick_scores):
    assert trick_scores[f"assert: {name}"] == 0.0


@pytest.mark.parametrize("name", IO_TRICKS)
def test_io_trick_scores_zero(name, trick_scores):
    assert trick_scores[f"io: {name}"] == 0.0


def test_the_tricks_fail_for_their_trick_not_for_a_broken_add():
    """The same tricks around a right add still pass where the trick leaves the case alone, so
    a zero above is the harness refusing the trick, not the harness being broken."""
    right = "def add(a, b):\n    return a + b\n"
    kept = ["builtins patched (eval, type, isinstance, repr, str, print)",
            "json, marshal and pickle patched to write a 5",
            "the harness patched through sys.modules", "fake success lines on stdout and stderr",
            "files written where a harness might read results",
            "sys.stdout and sys.stderr replaced"]  # fmt: skip
    programs = [ASSERT_TRICKS[name].replace(WRONG, right) for name in kept]
    assert all(right in p for p in programs)
    scores = reward([""] * len(kept), [r1(p) for p in programs], tests=[[ASSERT]] * len(kept))
    assert dict(zip(kept, scores, strict=True)) == dict.fromkeys(kept, 1.0)


# ---- honest programs --------------------------------------------------------------------------


def test_honest_programs_score_their_fraction():
    right = "def add(a, b):\n    return a + b\n"
    partial = "def add(a, b):\n    return a + b if a != b else 0\n"
    cases = [ASSERT, "assert add(-1, 1) == 0", "assert 8 == add(4, 4)"]
    io = [IO, ("10 -4", "6\n"), {"input": "3 3", "output": "6"}]
    reader = "a, b = map(int, input().split())\nprint({} if a != b else 0)\n"
    programs = [right, partial, WRONG, reader.format("a + b"), reader.format("a + b")]
    tests = [cases, cases, cases, io, io[:2]]
    scores = reward([""] * 5, [r1(p) for p in programs], tests=tests)
    assert scores == [1.0, 2 / 3, 0.0, 2 / 3, 1.0]


def test_floats_compare_within_the_stated_tolerance():
    program = """
        import math
        def area(r):
            return r * r * math.pi  # not bit-identical to the expected pi * r * r
        def ratio(a, b):
            return a / b
        """
    cases = ["assert area(3) == 28.274333882308138", "assert ratio(1, 3) == 0.3333333333333333",
             "assert math.isclose(area(2), 12.57, rel_tol=1e-3)", "assert ratio(4, 2) == 2",
             "assert ratio(1, 3) == 0.333", "assert area(1) == 3"]  # fmt: skip
    scores = reward([""] * 6, [r1(program)] * 6, tests=[[c] for c in cases])
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_honest_programs_using_the_standard_library_pass():
    """The program runs on a thread of its own: what the standard library does there (frames
    for namedtuple, threads, recursion, dataclasses, input) still works."""
    program = """
        import collections, dataclasses, functools, sys, threading, typing
        sys.setrecursionlimit(10_000)
        Point = collections.namedtuple("Point", "x y")
        class Pair(typing.NamedTuple):
            a: int
            b: int
        @dataclasses.dataclass(frozen=True)
        class Box:
            items: tuple
        @functools.lru_cache(None)
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)
        def depth(n):
            return 0 if n == 0 else 1 + depth(n - 1)
        def summary(n):
            out = []
            worker = threading.Thread(target=lambda: out.append(sum(range(n))))
            worker.start()
            worker.join()
            p, q = Point(1, 2), Pair(3, 4)
            return {"fib": fib(80), "depth": depth(3000), "sum": out[0], "p": tuple(p),
                    "q": q.a + q.b, "box": Box((1,)).items, "set": {1, 2}, "none": None}
        def is_prime(n):
            return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))
        class Solution:
            def is_valid(self, s):
                return s.count("(") == s.count(")")
        print("top level output is fine")
        """
    expected = {"fib": 23416728348467685, "depth": 3000, "sum": 4950, "p": (1, 2), "q": 7,
                "box": (1,), "set": {1, 2}, "none": None}  # fmt: skip
    cases = [f"assert summary(100) == {expected!r}", "assert is_prime(7)",
             "assert not is_prime(8)", "assert is_prime(9) is False",
             "assert Solution().is_valid('(())')", "assert is_prime(1) == False"]  # fmt: skip
    scores = reward([""] * 6, [r1(program)] * 6, tests=[[c] for c in cases])
    assert scores == [1.0] * 6


def test_a_truthy_result_and_a_bytes_like_result():
    program = "def pick(xs):\n    return [x for x in xs if x > 1]\n"
    program += "def raw():\n    return bytearray(b'ab')\n"
    cases = ["assert pick([1, 2])", "assert not pick([0, 1])", "assert raw() == b'ab'"]
    scores = reward([""] * 3, [r1(program)] * 3, tests=[[c] for c in cases])
    assert scores == [1.0, 1.0, 1.0]


# ---- the parent's side: test cases, reports, comparison ---------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "assert 1",  # nothing of the program decides it
        "assert add(2, 3) > 4",  # a verdict computed in the sandbox
        "assert abs(add(2, 3) - 5) < 1e-9",
        "assert (add(2, 3) == 5) == True",
        "assert isinstance(add(2, 3), int)",  # a builtin's verdict on the program's object
        "assert math.isclose(add(2, 3), x)",
        "assert add(2, 3) == add(3, 2)",  # no literal to compare with
        "assert 5 == 5",
        "assert add(2, 3) == ...",  # not plain data
        "assert add(2, 3) is 5",
        "assert add(2, 3) == 5\nassert add(1, 1) == 2",
        "print(add(2, 3))",
        "assert add(2, 3 == 5",
    ],
)
def test_malformed_assert_cases_are_rejected_by_name(code):
    with pytest.raises(ValueError, match=r"tests\[0\]\[1\]: assert case"):
        reward([""], [r1(WRONG)], tests=[[ASSERT, code]])


def test_only_the_expression_enters_the_sandbox():
    case = AssertCase("assert [1, -2.5, (3,)] == sorted_pair(5, 'x'), 'a message'")
    assert (case.expression, case.check, case.expected) == (
        "sorted_pair(5, 'x')",
        Check.EQUAL,
        [1, -2.5, (3,)],
    )
    assert "1, -2.5" not in case.expression and "message" not in case.expression
    close = AssertCase("assert math.isclose(area(2), 12.57, rel_tol=1e-3)")
    assert (close.expression, close.expected, close.rel_tol, close.abs_tol) == (
        "area(2)",
        12.57,
        1e-3,
        0.0,
    )
    assert to_cases(["assert not f(1)"])[0].check is Check.FALSY


def test_a_report_needs_the_secret_and_nothing_else_on_the_pipe():
    five = "def add(a, b):\n    return a + b\n"
    ok = run_python(five, limits=LIMITS, evaluate="add(2, 3)")
    assert (ok.value, decode(ok.value)) == (FIVE, 5)
    after = run_python(five + "import os\nfor fd in range(3, 64):\n    try:\n"
                       "        os.write(fd, b'x')\n    except OSError:\n        pass\n",
                       limits=LIMITS, evaluate="add(2, 3)")  # fmt: skip
    assert after.value is None  # junk before the harness's record
    plain = run_python(five, limits=LIMITS)
    assert plain.value is None


def test_equal_rules():
    assert equal(5, 5) and equal(5.0, 5) and equal(0.1 + 0.2, 0.3) and equal(1 + 1e-12, 1)
    assert not equal(1.0, 1.001) and not equal(float("nan"), float("nan"))
    assert not equal(True, 1) and not equal(1, True) and not equal(0, False) and not equal(0, None)
    assert equal([1, (2.0, "a")], [1, (2, "a")]) and not equal([1, 2], (1, 2))
    assert equal({1: [0.1 + 0.2]}, {1.0: [0.3]}) and not equal({True: 1}, {1: 1})
    assert equal({1, 2}, frozenset({2, 1})) and not equal({0.30000000000000004}, {0.3})
    assert equal(2**200, 2**200) and not equal(2**2000, 1e300) and equal(1 + 2j, 1 + 2j)
    assert not equal("5", 5) and not equal(b"5", "5")


@pytest.mark.parametrize(
    "text",
    ["", "zz", FIVE + "00", "4e4e", "5bffffffff", "7b", "2e", "63" + "00" * 40,
     "6c" + "e9030000" + "0000" * 1001, "5b01000000" * 70 + "4e", "3c01000000" + "5b00000000"],
)  # fmt: skip
def test_decode_rejects_anything_but_plain_marshal(text):
    with pytest.raises(ValueError, match="malformed report"):
        decode(text)


def test_encode_decode_round_trip():
    values = [None, True, -3, 2**100, -2.5, float("inf"), 1j, "é\ud800", b"\x00", [1, (2,)],
              {(1, 2): {"a": frozenset({3})}}, set(), ()]  # fmt: skip
    for value in values:
        assert type(decode(encode(value))) is type(value) and equal(decode(encode(value)), value)
