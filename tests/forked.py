"""`python -m align ...` in a process forked from a server that imported torch, transformers, TRL and peft once.

A fresh interpreter pays 7-8 s of imports before align runs a line (more than most tiny stages take), and the CLI
tests start about a dozen of them. Here each test process (pytest-xdist worker) starts one multiprocessing
forkserver, which imports the stack once; every command is a child forked from it, with its own arguments, working
folder, environment and stdout/stderr, running align/__main__.py as `python -m align` does (runpy), its exit code
and atexit handlers included. The forkserver runs no Python thread beside its own (checked: its one other
thread is pyarrow's jemalloc background thread, which jemalloc's own fork handlers keep safe), so no lock is
copied into a child while another thread holds it.

What still starts real interpreters: the README guide (tests/test_packaging.py), the launchers
(tests/test_launchers.py, torchrun and accelerate start their own processes) and the benchmark scripts.
"""

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

# imported by the server before it forks anything: what `python -m align` imports, and what its stages import
# lazily (TRL's trainers, peft, the model classes)
PRELOAD = ["align.__main__", "align.stages.sft", "align.stages.rm", "align.stages.dpo", "align.stages.safety_eval",
           "peft", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "transformers.models.llama.modeling_llama"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _main(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """The child: `python -m align <args>` in `cwd` with `env`, stdout and stderr to the files `out` and `err`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["align", *args]
    sys.modules.pop("align.__main__", None)  # preloaded for its imports; runpy runs a fresh copy as __main__
    try:
        runpy.run_module("align", run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # an interpreter's exit runs them (W&B finishes its run there); a forked child does not
        sys.stdout.flush()
        sys.stderr.flush()


class Align:
    """A started `python -m align` child: pid, kill(), wait(), and its output once it has ended."""

    def __init__(self, args: list[str], cwd: Path, env: dict):
        self.args = ["python", "-m", "align", *args]
        self._dir = tempfile.mkdtemp(prefix="align-cli-")
        self._out, self._err = os.path.join(self._dir, "out"), os.path.join(self._dir, "err")
        self._proc = _context().Process(target=_main, args=(list(args), str(cwd), env, self._out, self._err))
        self._proc.start()
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        return self._proc.exitcode

    def kill(self) -> None:
        self._proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        code = self.wait(timeout)
        out, err = Path(self._out).read_text(errors="replace"), Path(self._err).read_text(errors="replace")
        for path in (self._out, self._err):
            os.unlink(path)
        os.rmdir(self._dir)
        return subprocess.CompletedProcess(self.args, code, out, err)
