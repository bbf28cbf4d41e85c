"""Runs untrusted Python (HumanEval completions) with no secrets, network or writes outside.

Each program runs in a fresh interpreter started through a small launcher
(`train.eval.sandbox_launcher`, run as a script with ``python -I -S``; not a ``preexec_fn``, which is
unsafe to fork from a multithreaded process such as JAX's). The process tree::

  caller ── launcher (own session) ── init (pid 1 of a new PID namespace) ── candidate

On Linux, as root or where unprivileged user namespaces are allowed, the launcher unshares new
mount, network, PID, IPC and UTS namespaces (plus a user namespace when not root); init builds a
new root on a tmpfs that holds only read-only binds of the system directories and the Python
installation, a private size-limited ``/tmp`` (the only writable place), four ``/dev`` nodes and
a fresh ``/proc`` that shows only the sandbox's processes; then it ``pivot_root``\\ s into it.
The candidate drops its privileges (as root: a uid of its own, so the process limit counts only
its processes; otherwise: a nested user namespace, so no capability survives ``execve``), sets
``PR_SET_NO_NEW_PRIVS`` and resource limits, and ``execve``\\ s ``python -I`` with an environment
of ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` only. When the candidate exits or its time is up,
init exits, and the kernel kills every process left in the namespace before init's parent sees
it gone: nothing survives the call.

Where this isolation cannot be set up (not Linux, no privileges, a container's seccomp policy),
``run_python`` prints one warning naming the reason and runs the program with the rest: the
scrubbed environment, the temporary working directory, its own session, the resource limits,
and the descendants killed at the end (found as orphans of a child subreaper, on Linux).

Completion is proven by a marker: the program arrives on stdin after a random 128-bit marker
that never appears in its text, and the wrapper writes the marker to stdout only once the whole
program has run. ``sys.exit``, ``os._exit``, ``exec`` or a signal before the end leave it out.
The marker lives in a local variable of the wrapper, so a program that deliberately digs it out
of the interpreter (frames, ``gc``) can forge it, as it can pass the tests by returning an
object equal to everything: the marker guards against exits, not against an adversary in the
same process.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading

from train.eval import sandbox_launcher


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one run.

  Attributes:
    memory_bytes: address space of each process (``RLIMIT_AS``).
    file_bytes: the largest file a process may write, stdout and stderr included
      (``RLIMIT_FSIZE``).
    processes: processes and threads (``RLIMIT_NPROC``; per run when isolated as root or in a
      user namespace, otherwise counted over all of the user's processes).
    open_files: open file descriptors per process (``RLIMIT_NOFILE``).
    tmp_bytes: size of the private ``/tmp`` (isolated runs only).
  """

  memory_bytes: int = 2 << 30
  file_bytes: int = 16 << 20
  processes: int = 64
  open_files: int = 256
  tmp_bytes: int = 64 << 20


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What one run did.

  Attributes:
    finished: the program ran to its last statement (its marker was written).
    timed_out: it was killed at the time limit.
    returncode: the launcher's exit code: ``sandbox_launcher.SETUP_FAILED`` or ``TIMED_OUT``,
      the program's code, or 128 + the signal that killed it.
    stdout: its standard output, the marker removed.
    stderr: its standard error.
  """

  finished: bool
  timed_out: bool
  returncode: int
  stdout: str
  stderr: str


_isolation_lock = threading.Lock()
_isolation: list[str | None] = []  # [None] isolated, [reason] when it cannot be; [] not probed


def isolation_unavailable() -> str | None:
  """None when runs are isolated in namespaces, else why not (probed once, warned once)."""
  with _isolation_lock:
    if not _isolation:
      reason = _probe()
      _isolation.append(reason)
      if reason is not None:
        print(
          f"WARNING: untrusted code runs WITHOUT isolation ({reason}): it can reach the network, "
          "write wherever this user can, read this process's environment through /proc and "
          "leave processes behind if they escape the subreaper. Only the scrubbed environment, "
          "the temporary directory, its own session and the resource limits apply. Run as root "
          "or where unprivileged user namespaces are allowed to isolate it.",
          file=sys.stderr,
          flush=True,
        )
    return _isolation[0]


def _probe() -> str | None:
  if sys.platform != "linux":
    return f"namespaces need Linux, this is {sys.platform}"
  outcome = _launch("", 30.0, Limits(), isolate=True)
  if outcome.finished:
    return None
  lines = outcome.stderr.strip().splitlines()
  return lines[-1] if lines else f"the probe exited with code {outcome.returncode}"


def run_python(source: str, timeout: float, limits: Limits = Limits()) -> Outcome:
  """Runs Python source untrusted (module docstring): isolated where possible.

  Args:
    source: the program, run as ``__main__``.
    timeout: seconds of wall time before the whole process tree is killed.
    limits: resource limits.

  Returns:
    The `Outcome`; ``finished`` only if the program ran to its end.
  """
  return _launch(source, timeout, limits, isolate=isolation_unavailable() is None)


def _launch(source: str, timeout: float, limits: Limits, *, isolate: bool) -> Outcome:
  marker = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as work:
    home, root = os.path.join(work, "home"), os.path.join(work, "root")
    os.mkdir(home)
    os.mkdir(root)
    config = {
      "isolate": isolate,
      "timeout": timeout,
      "limits": dataclasses.asdict(limits),
      "home": home,
      "root": root,
      "python": sys.executable,
      "python_prefixes": sorted(
        {
          os.path.realpath(p)
          for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
        }
        | {os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
      ),
    }
    with (
      open(os.path.join(work, "stdout"), "w+b") as out,
      open(os.path.join(work, "stderr"), "w+b") as err,
    ):
      launcher = subprocess.Popen(
        [
          sys.executable,
          "-I",
          "-S",
          os.path.abspath(sandbox_launcher.__file__),
          marshal.dumps(config).hex(),
        ],
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        cwd=home,
        env=sandbox_launcher.environment(home),
        start_new_session=True,
      )
      try:  # the launcher kills at `timeout`; this is the backstop if it cannot
        launcher.communicate((marker + "\n" + source).encode(), timeout=timeout + 10)
      except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
      out.seek(0)
      err.seek(0)
      stdout, stderr = out.read(), err.read()
  # Anywhere, not only last: a child of the program may still write before it is killed.
  end = ("\n" + marker + "\n").encode()
  return Outcome(
    finished=end in stdout,
    timed_out=launcher.returncode in (sandbox_launcher.TIMED_OUT, -signal.SIGKILL),
    returncode=launcher.returncode,
    stdout=stdout.replace(end, b"", 1).decode(errors="replace"),
    stderr=stderr.decode(errors="replace"),
  )
