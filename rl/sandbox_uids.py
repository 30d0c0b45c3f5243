"""Dedicated uids for sandbox runs (rl/sandbox.py): hand each concurrent run a uid that no user
and no process has, and find and kill what is left of a uid after its run."""

from __future__ import annotations

import os
import pwd
import stat
import sys
import threading
import time

from rl.sandbox_child import _kill_all_of


class UidPool:
    """Hands each concurrent run a uid that no user and no process has (the parent is root)."""

    def __init__(self):
        self._lock, self._taken = threading.Lock(), set()

    def claim(self) -> int:
        start, count = max(((int(f[0]), int(f[2])) for f in uid_map()), key=lambda r: r[1])
        low, high = max(start, 1), min(start + count, 2**31 - 1)
        if high - low > 1 << 25:  # far above login and system uids
            low = max(low, 1 << 24)
        with self._lock:
            for _ in range(1000):
                uid = low + int.from_bytes(os.urandom(4), "little") % (high - low)
                if uid not in self._taken and not exists(uid) and not live_processes(uid):
                    self._taken.add(uid)
                    return uid
        raise RuntimeError(f"no free uid in [{low}, {high})")

    def release(self, uid: int) -> None:
        with self._lock:
            self._taken.discard(uid)


UIDS = UidPool()  # one pool per parent process: concurrent runs must not share a uid


def uid_map() -> list[list[str]]:
    """This process's uid map: [first uid inside, first outside, count] rows."""
    with open("/proc/self/uid_map") as file:
        return [line.split() for line in file]


def exists(uid: int) -> bool:
    """Whether the user database knows `uid`."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def readable_by_all(path: str = sys.base_prefix) -> bool:
    """Whether any user can reach and list `path` (every ancestor searchable by others)."""
    modes = [os.stat(path).st_mode & stat.S_IROTH]
    while path != os.path.dirname(path):
        modes.append(os.stat(path).st_mode & stat.S_IXOTH)
        path = os.path.dirname(path)
    return all(modes)


def live_processes(uid: int) -> list[int]:
    """Pids of processes (zombies excepted) whose real, effective or saved uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        state = uids = ""
        try:
            with open(f"/proc/{name}/status", errors="replace") as file:
                for line in file:
                    if line.startswith("State:"):
                        state = line.split()[1]
                    elif line.startswith("Uid:"):
                        uids = line.split()[1:4]
                        break
        except OSError:
            continue
        if state != "Z" and str(uid) in uids:
            pids.append(int(name))
    return pids


def kill_survivors(uid: int) -> list[int]:
    """Backstop after a run (the supervisor normally did it): kill what is left of `uid`;
    returns the pids still alive."""
    for _ in range(5):
        if not (alive := live_processes(uid)):
            return []
        _kill_all_of(uid)
        for _ in range(50):  # SIGKILL is delivered asynchronously
            if not (alive := live_processes(uid)):
                return []
            time.sleep(0.002)
    return alive
