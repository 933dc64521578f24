"""One writer per output directory: a lock file naming its holder.

The lock is ``output_dir/.mla_components.lock``, held with ``flock`` for the life of the process that took it, so the
kernel releases it however that process ends (a lock left by a dead process is stale and taken over). Its content
(host, pid, start time) is only for the message a second writer gets. Where ``flock`` is not supported, a lock whose
holder ran on this host and no longer runs is stale; any other is refused.
"""

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".mla_components.lock"
_held: dict[Path, int] = {}  # lock path -> open file descriptor, kept until the process exits


class OutputDirLockedError(RuntimeError):
    """Another live process writes to this output directory; the message names it and the fix."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid from a later process reusing it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here
    started = _start_time(int(holder.get("pid", 0)))
    return started is not None and started == holder.get("start_time", started)


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def lock_output_dir(output_dir: str | Path) -> Path:
    """Take the lock of ``output_dir`` (created if needed) for the rest of this process; returns the lock file.

    Taking it again in the same process is a no-op.

    Raises:
        OutputDirLockedError: a live process (on this or, when ``flock`` is unavailable, another host) holds it.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = (output_dir / LOCK_NAME).resolve()
    if path in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(path)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or _holder_alive(holder):
            os.close(fd)
            raise OutputDirLockedError(
                f"output_dir {output_dir} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}; lock file {path}): wait for that run "
                "to end or stop it, or choose another output_dir; delete the lock file only if that process is gone"
            ) from None
    previous = _read_holder(path)
    if previous:
        log.info("output_dir %s: the lock of pid %s on %s is stale (that process ended); taking it", output_dir,
                 previous.get("pid"), previous.get("host"))  # fmt: skip
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": _start_time(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    _held[path] = fd
    return path
