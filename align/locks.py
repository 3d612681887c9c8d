"""One writer per stage folder: outputs/<run.name>/.<stage>.lock holds the writer's pid and host.

runs.prepare() takes it, runs.finish() releases it, and so do run_stage's finally and the interpreter's exit
when a stage fails. A lock whose pid is no longer running on this host is taken over with a warning; one held
by a live process, or by another host (whose pids we cannot check), is refused in one line.
"""

import atexit
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from align import AlignError

log = logging.getLogger(__name__)


def lock_path(run, stage: str) -> Path:
    """outputs/<run.name>/.<stage>.lock for the `run` section."""
    return Path(run.output_dir) / run.name / f".{stage}.lock"


_HELD: set[Path] = set()


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


@contextlib.contextmanager
def _guard(run_folder: Path):
    """Serialise lock changes in one run folder, so two processes cannot both take over a dead holder's lock."""
    import fcntl

    with open(run_folder / ".lock-guard", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # closing the file releases the flock


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return {"pid": holder.get("pid"), "host": holder.get("host")}
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError, OSError):
        return {"pid": "?", "host": "?"}  # unreadable: never taken over silently


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume a live holder rather than risk two writers
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def acquire(run, stage: str) -> None:
    """Hold the stage's lock (a file with our pid and host), or refuse in one line while another process does."""
    path, me = lock_path(run, stage), _me()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _guard(path.parent):
        holder = _holder(path)
        if holder is not None and holder != me:
            if holder["host"] != me["host"] or _alive(holder["pid"]):
                raise AlignError(f"another process (pid {holder['pid']}, host {holder['host']}) holds run "
                                 f"'{run.name}' stage {stage} ({path}); wait for it to end, or delete that "
                                 f"file if the process is gone")
            log.warning("%s: taking over the lock of pid %s, which is no longer running", path, holder["pid"])
        tmp = path.with_name(path.name + f".{me['pid']}.tmp")
        tmp.write_text(json.dumps({**me, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        tmp.replace(path)
    _HELD.add(path)


def _release(path: Path) -> None:
    _HELD.discard(path)
    if not path.parent.exists():
        return
    with _guard(path.parent):
        if _holder(path) == _me():
            path.unlink(missing_ok=True)


def release(run, stage: str) -> None:
    _release(lock_path(run, stage))


@atexit.register
def release_all() -> None:
    """Every lock this process holds (run_stage's finally, and at exit, so a failed stage frees its folder)."""
    for path in list(_HELD):
        _release(path)
