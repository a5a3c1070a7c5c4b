"""Run CLI command lines each in its own process without paying the imports each time
(tests/commands/test_bad_inputs.py): a zygote process imports ``obliteratus.cli`` (torch,
transformers, ...) once, then forks one child per command line. The child changes to the row's
directory, takes the row's environment, sends stdout and stderr to files, runs ``cli.main`` with the
row's argv as ``python -m obliteratus.cli`` would, and exits with its code: what a fresh subprocess
does, less the 3-4 s of imports (the campaign's 260 rows went from about 13 to about 4 minutes).

tests/test_imports.py uses it too, with a zygote that has imported only the third-party libraries
(``preload``): each child then imports one module of the package as a fresh interpreter would.

Protocol: one JSON request per line on stdin ``{"argv" | "exec", "cwd", "env", "out", "err",
"timeout"}`` (argv: a CLI command line; exec: Python source run as ``python -c`` would), one JSON
reply per line on stdout ``{"code": int | null}`` (null: killed after `timeout` seconds).
Python's own ``os.fork``: POSIX only; elsewhere the campaign runs plain subprocesses.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _child(request: dict) -> None:
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        try:
            if "exec" in request:
                sys.argv = ["-c"]
                exec(compile(request["exec"], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = ["obliteratus", *request["argv"]]
                from obliteratus.cli import main

                main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # what an uncaught exception does in `python -m`: the traceback, exit 1
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(preload: list[str]) -> None:
    for name in preload:  # the imports every child shares
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request["timeout"]
        code = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        sys.stdout.write(json.dumps({"code": code}) + "\n")
        sys.stdout.flush()


class Zygote:
    """One zygote process; :meth:`run` is one command line (one at a time per zygote)."""

    def __init__(self, env: dict[str, str], preload: tuple[str, ...] = ("obliteratus.cli",)):
        self.proc = subprocess.Popen([sys.executable, __file__, *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str, str]:
        """`argv` through the CLI in `cwd` with the environment `env`: (exit code, stdout, stderr)."""
        return self._request({"argv": argv}, cwd, env, timeout)

    def exec(self, code: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str, str]:
        """Python source `code`, as ``python -c code`` would run it."""
        return self._request({"exec": code}, cwd, env, timeout)

    def _request(self, what: dict, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str, str]:
        out, err = cwd.parent / f".{cwd.name}.{id(what)}.out", cwd.parent / f".{cwd.name}.{id(what)}.err"
        self.proc.stdin.write(json.dumps({**what, "cwd": str(cwd), "env": env, "out": str(out),
                                          "err": str(err), "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the zygote process died")
        text = out.read_text("utf-8", errors="replace"), err.read_text("utf-8", errors="replace")
        out.unlink()
        err.unlink()
        return json.loads(reply)["code"], *text

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    src = Path(__file__).resolve().parents[2] / "src"
    if str(src) not in sys.path and (src / "obliteratus").is_dir():
        sys.path.insert(0, str(src))
    serve(sys.argv[1:])
