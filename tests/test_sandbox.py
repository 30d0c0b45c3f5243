"""Hostile programs against rl/sandbox.py and the code-execution reward (issue 6); programs
that try to fake a pass are in tests/test_code_reward_hostile.py (issue 13).

Each hostile case checks the host afterwards (files untouched, no connection accepted, no
process of the run left, limits hit), so it fails when the protection is missing. The escape
cases also run under each layer alone, the kernel layers without the audit hook and the hook
without the kernel layers, so each is shown to hold by itself.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import socket
import subprocess
import tempfile
import textwrap
import uuid

import pytest

from rl.code_reward import (
    AssertCase,
    IOCase,
    code_execution,
    extract_program,
    make_code_execution,
    same_output,
    to_cases,
)
from rl.rewards import Weighted, format_reward
from rl.sandbox import Isolation, Limits, Status, detect_isolation, run_python

FAST = Limits(wall_s=2.0, cpu_s=2, memory_bytes=256 << 20, max_output_bytes=1 << 16)
SLACK_S = 0.75  # start-up, kill and reap on a busy 2-core machine
FULL = detect_isolation()
HOOK_ONLY = Isolation(False, False, False, False, audit_hook=True)
MODES = {"full": FULL, "hook-only": HOOK_ONLY}
if FULL.network_namespace and FULL.read_only_filesystem and FULL.dedicated_uid:
    MODES["kernel-only"] = dataclasses.replace(FULL, audit_hook=False)
# what each mode's refusal looks like: the layer that stopped it
MARKS = {"full": "sandbox refused", "hook-only": "sandbox refused", "kernel-only": "Errno"}


def run(code: str, mode: str = "full", stdin: str = "", **limits):
    return run_python(
        textwrap.dedent(code), stdin, dataclasses.replace(FAST, **limits), MODES[mode]
    )


def read(path: str) -> str:
    with open(path) as file:
        return file.read()


def processes_of(uid: int) -> list[str]:
    """Every process (zombies too) whose real uid is `uid`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as file:
                status = file.read()
        except OSError:
            continue
        if f"\nUid:\t{uid}\t" in status:
            found.append(pid)
    return found


def attempts(code: str) -> str:
    """Wrap each line of `code` so that the program reports how it went, line by line."""
    body = "\n".join(
        f"try:\n    {line}\n    print('DONE', {line!r})\nexcept Exception as e:\n    print('NO', e)"
        for line in textwrap.dedent(code).strip().splitlines()
    )
    return "import os, shutil\n" + body


@pytest.fixture
def outside():
    """A world-writable directory under /tmp (reachable by any uid) holding a victim file."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="sandbox-victim-")
    os.chmod(path, 0o777)
    victim = os.path.join(path, "victim.txt")
    with open(victim, "w") as file:
        file.write("original")
    os.chmod(victim, 0o666)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


# ---- escapes, under every layer ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cannot_write_outside(mode, outside):
    stray = f"/tmp/sandbox-stray-{uuid.uuid4().hex}"
    result = run(
        attempts(f"""
            open({outside!r} + "/new.txt", "w").write("pwned")
            open({outside!r} + "/victim.txt", "a").write("pwned")
            os.close(os.open({outside!r} + "/victim.txt", os.O_WRONLY | os.O_TRUNC))
            os.mkdir({outside!r} + "/newdir")
            open({stray!r}, "w").write("pwned")
            assert os.system("echo pwned > {stray}.sh") == 0
        """),
        mode,
    )
    assert result.status is Status.OK, result.stderr
    assert "DONE" not in result.stdout and MARKS[mode] in result.stdout
    assert os.listdir(outside) == ["victim.txt"]
    assert read(os.path.join(outside, "victim.txt")) == "original"
    assert not os.path.exists(stray) and not os.path.exists(stray + ".sh")


@pytest.mark.parametrize("mode", MODES)
def test_cannot_delete_or_rename_outside(mode, outside):
    victim = os.path.join(outside, "victim.txt")
    result = run(
        attempts(f"""
            os.remove({victim!r})
            os.rename({victim!r}, {outside!r} + "/moved.txt")
            os.chmod({victim!r}, 0o000)
            shutil.rmtree({outside!r})
        """),
        mode,
    )
    assert result.status is Status.OK, result.stderr
    assert "DONE" not in result.stdout and MARKS[mode] in result.stdout
    assert os.listdir(outside) == ["victim.txt"]
    assert os.stat(victim).st_mode & 0o777 == 0o666


@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_environment_secrets(mode, monkeypatch):
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("JAXSEEK_SECRET", secret)
    # a process of the parent's user with the secret in its initial environment
    holder = subprocess.Popen(["sleep", "30"], env={"JAXSEEK_SECRET": secret})
    try:
        result = run(
            f"""
            import os
            print(",".join(sorted(os.environ)), os.environ.get("JAXSEEK_SECRET"))
            for pid in ({holder.pid}, {os.getpid()}, 1):
                try:
                    print(open(f"/proc/{{pid}}/environ", "rb").read())
                except OSError as error:
                    print("NO", error)
            """,
            mode,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.status is Status.OK, result.stderr
    assert secret not in result.stdout + result.stderr
    names, value = result.stdout.splitlines()[0].split()
    assert set(names.split(",")) <= {"HOME", "LANG", "LC_CTYPE", "PATH", "TMPDIR"}
    assert value == "None"
    assert result.stdout.count("NO ") == 3 and MARKS[mode] in result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_cannot_open_a_socket(mode):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run(
            attempts(f"""
                __import__("socket").create_connection(("127.0.0.1", {port}), timeout=1)
                __import__("socket").socket().connect(("127.0.0.1", {port}))
                __import__("socket").socket(type=2).sendto(b"x", ("127.0.0.1", {port}))
            """),
            mode,
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert result.status is Status.OK, result.stderr
    assert "DONE" not in result.stdout and MARKS[mode] in result.stdout


@pytest.mark.parametrize("mode", [m for m in MODES if MODES[m].audit_hook])
def test_hook_refuses_escape_hatches(mode):
    result = run(
        attempts("""
            __import__("ctypes").CDLL(None).getpid()
            __import__("subprocess").run(["true"])
            os.execv("/bin/true", ["true"])
            os.kill(os.getppid(), 9)
            os.open("/tmp", os.O_RDONLY)
        """),
        mode,
    )
    assert result.status is Status.OK, result.stderr
    assert result.stdout.count("NO sandbox refused") == 5, result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_work_directory_is_private_writable_and_removed(mode):
    result = run(
        """
        import os, tempfile
        open("out.txt", "w").write("kept")
        os.makedirs("a/b")
        with tempfile.NamedTemporaryFile(dir=None) as file:  # TMPDIR is the work dir
            file.write(b"x")
        print(os.getcwd(), open("out.txt").read(), sorted(os.listdir(".")))
        """,
        mode,
    )
    assert result.status is Status.OK, result.stderr
    cwd, content, listing = result.stdout.split(" ", 2)
    assert content == "kept" and listing.strip() == "['a', 'out.txt']"
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))


# ---- resources ------------------------------------------------------------------------------


def test_normal_program():
    result = run(
        """
        import collections, fractions, heapq, json
        n = int(input())
        print(sum(map(int, input().split())) * n, json.dumps(collections.Counter("aab")))
        """,
        stdin="2\n1 2 3\n",
    )
    assert (result.status, result.returncode) == (Status.OK, 0)
    assert result.stdout == '12 {"a": 2, "b": 1}\n' and result.stderr == ""


def test_errors_and_exit_codes():
    assert run("def f(:\n").status is Status.ERROR
    crashed = run("import sys\nsys.exit(3)")
    assert (crashed.status, crashed.returncode) == (Status.ERROR, 3)
    failed = run("1 / 0")
    assert failed.status is Status.ERROR and "ZeroDivisionError" in failed.stderr
    assert run("print('bye')\nexit(0)").status is Status.OK  # exit() exists without site


def test_infinite_loop_times_out_on_the_wall_clock():
    result = run("while True:\n    pass", wall_s=1.0, cpu_s=30)
    assert result.status is Status.TIMEOUT
    assert result.wall_s < 1.0 + SLACK_S


def test_sleeping_past_the_limit_times_out():
    result = run("import time\nprint('start', flush=True)\ntime.sleep(60)", wall_s=1.0)
    assert result.status is Status.TIMEOUT and result.stdout == "start\n"
    assert result.wall_s < 1.0 + SLACK_S and result.cpu_s < 0.5


def test_cpu_limit():
    result = run("while True:\n    pass", wall_s=10.0, cpu_s=1)
    assert (result.status, result.returncode) == (Status.TIMEOUT, -signal.SIGXCPU)
    assert result.wall_s < 10.0


FORK_LOOP = """
import os, time
print(os.getuid(), flush=True)
forks = 0
while forks < 300:  # bounded so that a broken sandbox cannot take the host down
    try:
        pid = os.fork()
    except OSError as error:
        print("blocked", forks, type(error).__name__, flush=True)
        break
    if pid == 0:
        os.setsid()  # leave the session: only killing by uid still finds it
        time.sleep(60)
        os._exit(0)
    forks += 1
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["full", "hook-only"])
def test_fork_bomb(mode):
    result = run(FORK_LOOP, mode, wall_s=1.5, max_processes=6)
    assert result.status is Status.TIMEOUT and result.wall_s < 1.5 + SLACK_S
    uid, blocked, forks, error = result.stdout.split()
    assert blocked == "blocked"
    if MODES[mode].dedicated_uid:
        assert int(forks) < 6 and error == "BlockingIOError"  # RLIMIT_NPROC
        assert processes_of(int(uid)) == []  # killed and reaped, the setsid ones too
    else:
        assert int(forks) == 0 and error == "PermissionError"  # the hook refuses fork
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks


def test_children_die_with_the_program():
    result = run("""
        import os, time
        print(os.getuid(), flush=True)
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        """)
    assert result.status is Status.OK and result.wall_s < 1.0 + SLACK_S
    assert processes_of(int(result.stdout.split()[0])) == []


@pytest.mark.parametrize(
    "code", ["x = bytearray(1 << 40)", "a = []\nwhile True:\n    a.append(bytearray(1 << 20))"]
)
def test_memory_bomb(code):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(code, memory_bytes=128 << 20)
    assert result.status is Status.MEMORY, result.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB
    assert run("print(len(bytearray(32 << 20)))", memory_bytes=128 << 20).stdout == "33554432\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped(stream):
    result = run(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 4096)", wall_s=5.0)
    assert result.status is Status.OUTPUT_LIMIT and result.wall_s < 2.0
    assert getattr(result, stream) == "x" * FAST.max_output_bytes


def test_file_size_limit():
    result = run("open('big', 'wb').write(bytes(2 << 20))", max_file_bytes=1 << 20)
    assert result.status is Status.ERROR and "File too large" in result.stderr


def test_large_stdin_read_or_ignored():
    numbers = " ".join(map(str, range(200_000)))
    summed = run("print(sum(map(int, input().split())))", stdin=numbers)
    assert summed.stdout == f"{sum(range(200_000))}\n"
    assert run("print('ignored')", stdin=numbers).status is Status.OK


def test_isolation_and_limits_are_checked():
    if os.geteuid() == 0:
        assert FULL.dedicated_uid
    assert FULL.describe().count("\n") == 3
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=1.5)
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=1 << 20)


# ---- the reward -------------------------------------------------------------------------------

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
IO_TESTS = [{"input": "1 2", "output": "3"}, ("10 -4", "6\n"), {"input": "0 0", "output": "0"}]
reward = make_code_execution(Limits(wall_s=1.5, cpu_s=1, memory_bytes=128 << 20), workers=4)


def r1(answer: str) -> str:
    return f"<think>easy</think> <answer>{answer}</answer>"


def test_extract_program():
    assert extract_program(r1(ADD)) == ADD
    assert extract_program(r1(f"Here:\n```python\n{ADD}```")) == ADD
    assert extract_program(f"Sure.\n```py\nprint(1)\n```\nthen\n```\n{ADD}```") == ADD
    assert extract_program("print(1)") is None  # neither an answer nor a fence
    assert extract_program(r1("   ")) is None
    assert extract_program(r1("x" * 70_000)) is None


def test_same_output_ignores_trailing_whitespace_only():
    assert same_output("1 \n2\n\n", "1\n2")
    assert not same_output("1\n 2", "1\n2") and not same_output("12", "1\n2")


def test_reward_scores():
    partial = "a, b = map(int, input().split())\nprint(a + b if a > 0 else 99)\n"
    completions = [r1(ADD), r1(partial), r1("print(42)"), "no program here", r1("def f(:")]
    scores = reward([""] * 5, completions, tests=[IO_TESTS] * 5)
    assert scores == [1.0, 2 / 3, 0.0, 0.0, 0.0]


def test_reward_assert_style():
    program = "def add(a, b):\n    return a + b\n"
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 5"], "assert add(-1, 1) == 0"]
    assert reward(["", ""], [r1(program)] * 2, tests=tests) == [0.5, 1.0]


def test_reward_hostile_programs_score_zero(outside):
    hostile = [
        "while True:\n    pass",
        "import time\ntime.sleep(60)",
        FORK_LOOP,
        f"open({outside!r} + '/victim.txt', 'w').write('3')\nprint(3)",
        "import socket\nsocket.create_connection(('127.0.0.1', 22))\nprint(3)",
        "import sys\nwhile True:\n    sys.stdout.write('3\\n' * 1000)",
        "a = []\nwhile True:\n    a.append(bytearray(1 << 20))",
    ]
    tests = [[{"input": "1 2", "output": "3"}]] * len(hostile)
    assert reward([""] * len(hostile), [r1(h) for h in hostile], tests=tests) == [0.0] * 7
    assert read(os.path.join(outside, "victim.txt")) == "original"


def test_reward_interface():
    assert code_execution.__name__ == "code_execution"
    combined = Weighted({format_reward: 1.0, reward: 1.0})
    totals, per_fn = combined(["", ""], [r1(ADD), ADD], tests=[IO_TESTS, IO_TESTS])
    assert totals == [2.0, 0.0] and per_fn["code_execution"] == [1.0, 0.0]
    assert to_cases("assert f(1) == 2") == [AssertCase("assert f(1) == 2")]
    assert to_cases([("1", "2")]) == [IOCase("1", "2")]
    with pytest.raises(ValueError, match=r"tests\[0\]\[0\]"):
        reward([""], [r1(ADD)], tests=[[{"stdin": "1"}]])
    with pytest.raises(ValueError, match="non-empty"):
        reward([""], [r1(ADD)], tests=[[]])
