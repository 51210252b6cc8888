"""A fork server that runs CLI commands in child processes it can kill.

The server (``python tests/forkserver.py serve``, started by ``ForkServer``) imports torch,
transformers, onnx and every command's module once, then forks one child per request; a child runs
``cli.main(argv)`` exactly as ``python cli.py`` does, with its output in a log file and optionally a
file-size limit (RLIMIT_FSIZE: a full disk). The server kills a child with SIGKILL after a given delay
and reaps it (so that the dead pid is gone, as after a real kill). A request thus costs the command's
own work, not seconds of imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from cli_runs import ROOT, SUBPROCESS_ENV

CHILD_WATCHDOG_S = 240  # a child still running after this dumps its stack into its log and exits


class ForkServer:
    """Runs CLI commands in forked children of a process that imported everything once (see the module doc)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        env = {**os.environ, **SUBPROCESS_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = False  # it imports while the caller builds its fixtures

    def _request(self, request: dict, timeout: float) -> dict:
        if not self.ready:
            ready = self._reply(timeout=300)
            assert ready.get("ready") and ready["threads"] == 1, ready  # one thread: safe to fork
            self.ready = True
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def warm_up(self, argv: list) -> int:
        """Run ``argv`` (a short training run) inside the server itself, so that what the first model load,
        training step and plot initialise lazily is ready in every child. Returns the server's thread count."""
        return self._request({"warm": [str(a) for a in argv]}, timeout=300)["threads"]

    def run(
        self, argv: list[str], kill_after: float | None = None, fsize: int | None = None, timeout: float = 300
    ) -> dict:
        """Run ``cli.main(argv)`` in a child. Returns {"code": exit code (-9 when killed), "killed",
        "seconds", "log": the child's stdout and stderr}."""
        self.count += 1
        log = self.log_dir / f"run-{self.count}.log"
        request = {"argv": [str(a) for a in argv], "kill_after": kill_after, "fsize": fsize, "log": str(log)}
        reply = self._request(request, timeout)
        reply["log"] = log.read_text(errors="replace") if log.exists() else ""
        return reply

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            log = self.log_dir / f"run-{self.count}.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            raise TimeoutError(f"fork server gave no answer in {timeout} s; the child's log ends:\n{tail}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fresh_tqdm_locks() -> None:
    """Give this (forked) process tqdm write locks of its own.

    tqdm's default lock holds one multiprocessing semaphore for every tqdm class (transformers'
    progress bars included), and forked children share it: a child killed while drawing a bar
    leaves it taken, and the next child hangs on its first bar. Without the semaphore, tqdm falls
    back to a thread lock, and each class builds its lock anew on first use.
    """
    import tqdm.std

    tqdm.std.TqdmDefaultWriteLock.mp_lock = None
    classes = [tqdm.std.tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "_lock" in cls.__dict__:
            delattr(cls, "_lock")


def serve() -> None:
    """The server loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import faulthandler
    import signal

    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(1)
    # Everything a command imports lazily, imported once here so that children start at once. Not
    # onnxruntime: importing it starts a thread, and a process with threads is not safe to fork.
    import matplotlib.figure  # noqa: F401  (the rank heat map)
    import onnx  # noqa: F401
    import tqdm
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import adalora_export.converters.lora  # noqa: F401
    import adalora_export.converters.merge  # noqa: F401
    import adalora_export.converters.onnx  # noqa: F401
    import adalora_export.prune  # noqa: F401
    import adalora_export.report  # noqa: F401
    import adalora_export.serving  # noqa: F401
    import adalora_export.training  # noqa: F401
    from adalora_export import cli

    tqdm.tqdm.monitor_interval = 0  # no monitor thread (see above)
    out = sys.stdout
    print(json.dumps({"ready": True, "threads": len(os.listdir("/proc/self/task"))}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "warm" in request:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                try:
                    cli.main(request["warm"])
                except SystemExit:
                    pass
            print(json.dumps({"threads": len(os.listdir("/proc/self/task"))}), file=out, flush=True)
            continue
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: run the command, never return into the loop
            code = 1
            try:
                fresh_tqdm_locks()
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                # A hang shows where it happened (in the log) and ends the child instead of stalling the test.
                faulthandler.dump_traceback_later(CHILD_WATCHDOG_S, exit=True)
                sys.stdin = open(os.devnull)
                if request.get("fsize") is not None:
                    import resource

                    resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
                try:
                    cli.main(request["argv"])
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code)
        killed, deadline = False, request.get("kill_after")
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() - started >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)  # reaped: the pid no longer exists, as after a real kill
                break
            time.sleep(0.002)
        killed = killed and os.WIFSIGNALED(status)  # it may have finished just before the kill
        reply = {"code": os.waitstatus_to_exitcode(status), "killed": killed, "seconds": time.monotonic() - started}
        print(json.dumps(reply), file=out, flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
