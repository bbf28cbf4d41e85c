"""Runs untrusted Python (HumanEval completions) with no secrets, network or writes outside.

Each program runs in a fresh interpreter started through a small launcher
(`train.eval.sandbox_launcher`, run as a script with ``python -I -S``; not a ``preexec_fn``, which is
unsafe to fork from a multithreaded process such as JAX's). The process tree::

  caller ── launcher (own session) ── init (pid 1 of a new PID namespace) ── candidate

On Linux, as root or where unprivileged user namespaces are allowed, the launcher unshares new
mount, network, PID, IPC and UTS namespaces (plus a user namespace when not root); init builds a
new root on a tmpfs that holds only read-only binds of the system directories and of what the
interpreter needs (`_python_paths`: not the prefix folders, which may hold a project or other
environments), a private size-limited ``/tmp`` (the only writable place), four ``/dev`` nodes and
a fresh ``/proc`` that shows only the sandbox's processes; then it ``pivot_root``\\ s into it.
The candidate drops its privileges (as root: a uid of its own, so the process limit counts only
its processes; otherwise: a nested user namespace, so no capability survives ``execve``), sets
``PR_SET_NO_NEW_PRIVS`` and resource limits, and ``execve``\\ s ``python -I`` with an environment
of ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` only. When the candidate exits or its time is up,
init exits, and the kernel kills every process left in the namespace before init's parent sees
it gone: nothing survives the call. Nor the caller: the launcher, init and the candidate each
die with their parent (``PR_SET_PDEATHSIG``; the launcher's is the calling thread, which waits
for it), and the work folder a killed caller leaves (``sandbox-<pid>-*`` in the temporary
folder) is removed by the next process that runs a program, once its owner is gone. Whether the
time was up is known by the caller's clock; the program's stdout and stderr are pipes read as
they come, of which the last `OUTPUT_TAIL_BYTES` are kept.

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
import re
import secrets
import select
import selectors
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

from train.eval import sandbox_launcher


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one run.

  Attributes:
    memory_bytes: address space of each process (``RLIMIT_AS``).
    file_bytes: the largest file a process may write (``RLIMIT_FSIZE``; stdout and stderr are
      pipes, of which the caller keeps the last `OUTPUT_TAIL_BYTES`).
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
    timed_out: it did not finish within the time limit, by the caller's clock (so it was
      killed), whatever its exit code.
    returncode: the launcher's exit code: ``sandbox_launcher.SETUP_FAILED`` or ``TIMED_OUT``,
      the program's code, or 128 + the signal that killed it.
    stdout: the last `OUTPUT_TAIL_BYTES` of its standard output, the marker removed.
    stderr: the last `OUTPUT_TAIL_BYTES` of its standard error.
  """

  finished: bool
  timed_out: bool
  returncode: int
  stdout: str
  stderr: str


OUTPUT_TAIL_BYTES = 4096  # of stdout and of stderr kept per run: a program may write gigabytes
_WORK_DIR_PREFIX = "sandbox-"  # then the owner's pid: sandbox-<pid>-<random>
_sweep_lock = threading.Lock()
_swept = False  # the work folders of dead callers were removed (once per process)
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
  _remove_work_dirs_of_dead_callers()
  marker = secrets.token_hex(16)
  end = ("\n" + marker + "\n").encode()
  owned = f"{_WORK_DIR_PREFIX}{os.getpid()}-"  # removed by a later caller if this one is killed
  with tempfile.TemporaryDirectory(prefix=owned, ignore_cleanup_errors=True) as work:
    home, root = os.path.join(work, "home"), os.path.join(work, "root")
    os.mkdir(home)
    os.mkdir(root)
    python, python_paths = _python_paths()
    config = {
      "isolate": isolate,
      "timeout": timeout,
      "limits": dataclasses.asdict(limits),
      "home": home,
      "root": root,
      "parent": os.getpid(),
      "python": python,
      "python_paths": python_paths,
    }
    started = time.monotonic()
    with subprocess.Popen(
      [
        sys.executable,
        "-I",
        "-S",
        os.path.abspath(sandbox_launcher.__file__),
        marshal.dumps(config).hex(),
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      cwd=home,
      env=sandbox_launcher.environment(home),
      start_new_session=True,
    ) as launcher:
      # The launcher kills at `timeout`; the deadline is the backstop if it cannot.
      stdout, stderr, finished = _exchange(
        launcher, (marker + "\n" + source).encode(), end, started + timeout + 10
      )
    elapsed = time.monotonic() - started
  return Outcome(
    finished=finished,
    # By this clock: a program can exit with the launcher's TIMED_OUT code itself.
    timed_out=not finished and elapsed >= timeout,
    returncode=launcher.returncode,
    stdout=stdout.replace(end, b"", 1).decode(errors="replace"),
    stderr=stderr.decode(errors="replace"),
  )


def _exchange(
  launcher: subprocess.Popen, program: bytes, end: bytes, deadline: float
) -> tuple[bytes, bytes, bool]:
  """Writes `program` to the launcher's stdin and reads its stdout and stderr as they come,
  keeping the last `OUTPUT_TAIL_BYTES` of each, until both close or `deadline` (then the
  launcher's group is killed). Returns the two tails and whether `end` appeared on stdout
  (anywhere, not only last: a child of the program may still write before it is killed)."""
  tails = {launcher.stdout: bytearray(), launcher.stderr: bytearray()}
  finished = False
  unsent = memoryview(program)
  with selectors.DefaultSelector() as selector:
    selector.register(launcher.stdin, selectors.EVENT_WRITE)
    for stream in tails:
      selector.register(stream, selectors.EVENT_READ)
    while selector.get_map():
      left = deadline - time.monotonic()
      if left <= 0:
        os.killpg(launcher.pid, signal.SIGKILL)
        break
      for key, _ in selector.select(left):
        if key.fileobj is launcher.stdin:
          try:  # no more than PIPE_BUF: a writable pipe takes that much without blocking
            unsent = unsent[os.write(key.fd, unsent[: select.PIPE_BUF]) :]
          except BrokenPipeError:  # the launcher failed before it read the program
            unsent = unsent[:0]
          if not unsent:
            selector.unregister(launcher.stdin)
            launcher.stdin.close()
          continue
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
          selector.unregister(key.fileobj)
          continue
        tail = tails[key.fileobj]
        if key.fileobj is launcher.stdout:
          finished = finished or end in bytes(tail[-len(end) :]) + chunk
        tail += chunk
        del tail[:-OUTPUT_TAIL_BYTES]
  launcher.wait()
  return bytes(tails[launcher.stdout]), bytes(tails[launcher.stderr]), finished


def _python_paths() -> tuple[str, list[str]]:
  """(the interpreter as the sandbox runs it, the paths to bind read-only for it). It is run by
  its own name in its real folder: a venv's ``bin/python`` is a link beside which Python looks
  for ``pyvenv.cfg``. The paths are each link from there to the binary and the binary, a venv's
  ``pyvenv.cfg``, the standard library, the site-packages, and the folder of libpython (in a
  conda environment also of the shared libraries its extension modules load). Not the prefix
  folders themselves: a venv made in a project's root, or a conda installation, holds much else
  (a ``.env``, sockets, other environments)."""
  folder, name = os.path.split(sys.executable)
  links = [os.path.join(os.path.realpath(folder), name)]
  while os.path.islink(links[-1]):
    folder, name = os.path.split(os.path.join(os.path.dirname(links[-1]), os.readlink(links[-1])))
    links.append(os.path.join(os.path.realpath(folder), name))
  installed = sysconfig.get_paths()
  libraries = {installed[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
  libraries |= {*site.getsitepackages(), sysconfig.get_config_var("LIBDIR")}
  if sys.prefix != sys.base_prefix:
    libraries.add(os.path.join(sys.prefix, "pyvenv.cfg"))
  real = {os.path.realpath(p) for p in libraries if p and os.path.exists(p)}
  return links[0], sorted(real | set(links))


def _remove_work_dirs_of_dead_callers() -> None:
  """Removes the work folders that callers killed before their clean-up (``SIGKILL``, out of
  memory) left in the temporary folder: those whose owner, the pid in their name, is gone. A
  live caller's are left alone (a reused pid keeps a dead one's until that pid ends too)."""
  global _swept
  with _sweep_lock:  # once per process; concurrent first runs wait for it
    if _swept:
      return
    _swept = True
    temporary = tempfile.gettempdir()
    for name in os.listdir(temporary):
      owner = re.fullmatch(re.escape(_WORK_DIR_PREFIX) + r"(\d+)-\w+", name)
      if owner and not _running(int(owner[1])):
        shutil.rmtree(os.path.join(temporary, name), ignore_errors=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True
