"""Runs untrusted Python (HumanEval completions) with no secrets, network or writes outside.

Each program runs in a fresh interpreter started through a small launcher (this file, run as a
script with ``python -I -S``; no ``preexec_fn``, which is unsafe to fork from a multithreaded
process such as JAX's). The process tree::

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

import ctypes
import dataclasses
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading

SETUP_FAILED = 125  # exit code: the launcher could not set up the sandbox
TIMED_OUT = 124  # exit code: the program ran out of time and was killed

# clone(2), mount(2), umount2(2) and prctl(2) constants (linux/sched.h, linux/mount.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# A read-only remount of a bind keeps these flags of its source (statvfs's ST_* values equal
# MS_*): inside a user namespace, clearing one of them is refused.
_KEPT_MOUNT_FLAGS = (
  MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096
)  # noatime, nodiratime, relatime
_PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_DEVICES = ("null", "zero", "random", "urandom")
_SANDBOX_UID_BASE = 2_000_000_000  # + the launcher's pid: a uid owning nothing, one per run

# Runs in the candidate interpreter: reads the marker and the program from stdin, runs it, and
# writes the marker only if the program ran to its end.
_WRAPPER = """\
import os, sys
def _run():
  chunks = []
  while chunk := os.read(0, 1 << 16):
    chunks.append(chunk)
  marker, _, source = b"".join(chunks).partition(b"\\n")
  del chunks, chunk
  code = compile(source, "program.py", "exec")
  del source
  exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:
      pass
  os.write(1, b"\\n" + marker + b"\\n")
  os._exit(0)
_run()
"""


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
    returncode: the launcher's exit code (``SETUP_FAILED``, ``TIMED_OUT``, the program's code,
      or 128 + the signal that killed it).
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
        [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        cwd=home,
        env=_environment(home),
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
  end = ("\n" + marker + "\n").encode()
  finished = stdout.endswith(end)
  return Outcome(
    finished=finished,
    timed_out=launcher.returncode in (TIMED_OUT, -signal.SIGKILL),
    returncode=launcher.returncode,
    stdout=(stdout[: -len(end)] if finished else stdout).decode(errors="replace"),
    stderr=stderr.decode(errors="replace"),
  )


def _environment(home: str) -> dict[str, str]:
  """The whole environment of a run: nothing of the caller's."""
  return {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


# ----------------------------------------------------------------------------
# The launcher: runs as `python -I -S sandbox.py CONFIG` in the run's own session.


def _main(config: dict) -> None:
  """Unshares the namespaces, forks init, and exits with init's exit code."""
  sandbox_uid = _SANDBOX_UID_BASE + os.getpid()
  if config["isolate"]:
    try:
      _unshare_namespaces()
    except OSError as e:
      _setup_failed(e)
  init = os.fork()
  if init == 0:
    try:
      _init(config, sandbox_uid)
    except BaseException as e:  # noqa: BLE001 -- any failure here is a setup failure
      _setup_failed(e)
  _, status = os.waitpid(init, 0)
  os._exit(_exit_code(status))


def _init(config: dict, sandbox_uid: int) -> None:
  """Pid 1 of the sandbox (or a subreaper): runs the candidate, kills what is left, exits."""
  libc = _libc()
  _call(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
  if config["isolate"]:
    _build_root(libc, config)
    home = "/tmp"
  else:
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back here to be killed
    home = config["home"]

  def time_is_up(signum, frame):
    raise TimeoutError

  signal.signal(signal.SIGALRM, time_is_up)
  candidate = os.fork()
  if candidate == 0:
    try:
      _exec_candidate(libc, config, home, sandbox_uid)
    except BaseException as e:  # noqa: BLE001 -- any failure before exec is a setup failure
      _setup_failed(e)
  signal.setitimer(signal.ITIMER_REAL, config["timeout"])
  try:
    _, status = os.waitpid(candidate, 0)
    code = _exit_code(status)
  except TimeoutError:
    code = TIMED_OUT
  signal.setitimer(signal.ITIMER_REAL, 0)
  if not config["isolate"]:  # with a PID namespace, the kernel kills them when init exits
    _kill_descendants(candidate)
  os._exit(code)


def _unshare_namespaces() -> None:
  """New mount, network, PID, IPC and UTS namespaces; as non-root inside a new user namespace
  where this user is root (mapped to itself outside)."""
  libc = _libc()
  flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
  if os.geteuid() == 0:
    _call(libc.unshare(flags), "unshare")
    return
  uid, gid = os.geteuid(), os.getegid()
  _call(libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
  _map_ids(inside=0, outside_uid=uid, outside_gid=gid)


def _map_ids(inside: int, outside_uid: int, outside_gid: int) -> None:
  """Maps one uid and gid of this (new) user namespace to this process's own outside."""
  for name, text in (
    ("setgroups", "deny"),
    ("uid_map", f"{inside} {outside_uid} 1"),
    ("gid_map", f"{inside} {outside_gid} 1"),
  ):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)


def _build_root(libc, config: dict) -> None:
  """A new root: read-only system and Python directories, /dev nodes, /proc, a private /tmp."""
  root = config["root"]
  os.umask(0o022)  # the skeleton's directories must be traversable by the sandbox's uid
  _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
  _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  bound = []
  for path in (*_SYSTEM_PATHS, *config["python_prefixes"]):
    if path != "/" and not any(path == b or path.startswith(b + "/") for b in bound):
      _bind_read_only(libc, path, root + path)
      bound.append(path)
  for name in _DEVICES:
    target = f"{root}/dev/{name}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    open(target, "w").close()
    _mount(libc, f"/dev/{name}", target, None, MS_BIND)
  os.mkdir(f"{root}/tmp")
  tmp_options = f"size={config['limits']['tmp_bytes']},mode=1777"
  _mount(libc, "tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
  os.mkdir(f"{root}/proc")  # this process is pid 1 of the new PID namespace: its own /proc
  _mount(libc, "proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  os.mkdir(f"{root}/.old_root")
  machine = os.uname().machine
  if machine not in _PIVOT_ROOT_SYSCALL:
    raise OSError(f"pivot_root: syscall number unknown on {machine}")
  pivot = libc.syscall(_PIVOT_ROOT_SYSCALL[machine], root.encode(), f"{root}/.old_root".encode())
  _call(pivot, "pivot_root")
  os.chdir("/")
  _call(libc.umount2(b"/.old_root", MNT_DETACH), "umount /.old_root")  # the host is gone
  os.rmdir("/.old_root")
  _mount(libc, None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _bind_read_only(libc, source: str, target: str) -> None:
  """Binds a directory read-only (a symlink is copied as a symlink); a missing one is skipped."""
  if os.path.islink(source):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.symlink(os.readlink(source), target)
  elif os.path.isdir(source):
    os.makedirs(target)
    _mount(libc, source, target, None, MS_BIND)  # not MS_REC: no writable mounts below it
    kept = os.statvfs(target).f_flag & _KEPT_MOUNT_FLAGS
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept)


def _exec_candidate(libc, config: dict, home: str, sandbox_uid: int) -> None:
  """Drops privileges, sets the limits and becomes `python -I -c _WRAPPER`."""
  os.setpgid(0, 0)  # its own group: killed as one where there is no PID namespace
  if config["isolate"] and os.geteuid() == 0 and os.getuid() == 0:
    if _in_initial_user_namespace():
      os.setgroups([])
      os.setgid(sandbox_uid)
      os.setuid(sandbox_uid)
    else:  # root of the user namespace made by a non-root caller: nest one more, unprivileged
      _call(libc.unshare(CLONE_NEWUSER), "unshare (nested user namespace)")
      _map_ids(inside=1000, outside_uid=0, outside_gid=0)
  _call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
  limits = config["limits"]
  seconds = int(config["timeout"]) + 1
  for limit, value in (
    (resource.RLIMIT_AS, limits["memory_bytes"]),
    (resource.RLIMIT_FSIZE, limits["file_bytes"]),
    (resource.RLIMIT_NPROC, limits["processes"]),
    (resource.RLIMIT_NOFILE, limits["open_files"]),
    (resource.RLIMIT_CORE, 0),
    (resource.RLIMIT_CPU, seconds),
  ):
    resource.setrlimit(limit, (value, value))
  os.chdir(home)
  python = config["python"]
  os.execve(python, [python, "-I", "-c", _WRAPPER], _environment(home))


def _in_initial_user_namespace() -> bool:
  with open("/proc/self/uid_map") as f:
    return f.read().split() == ["0", "0", "4294967295"]


def _kill_descendants(candidate: int) -> None:
  """Kills the candidate's group, then every orphan reparented to this subreaper, until none."""
  try:
    os.killpg(candidate, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  while children := _children(os.getpid()):
    for pid in children:
      try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # its own children are reparented here by the time it is reaped
      except (ProcessLookupError, ChildProcessError):
        pass


def _children(parent: int) -> list[int]:
  """Pids whose parent is `parent`, from /proc (empty where there is no /proc)."""
  children = []
  for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          fields = f.read().rpartition(")")[2].split()  # after the command name
      except OSError:
        continue
      if int(fields[1]) == parent:
        children.append(int(name))
  return children


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str) -> None:
  if result != 0:
    number = ctypes.get_errno()
    raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount(libc, source, target, fstype, flags: int, data: str | None = None) -> None:
  encode = lambda s: None if s is None else s.encode()  # noqa: E731
  result = libc.mount(
    encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)
  )
  _call(result, f"mount {target}")


def _exit_code(status: int) -> int:
  code = os.waitstatus_to_exitcode(status)
  return code if code >= 0 else 128 - code


def _setup_failed(error: BaseException) -> None:
  print(f"sandbox setup failed: {error}", file=sys.stderr, flush=True)
  os._exit(SETUP_FAILED)


if __name__ == "__main__":
  _main(json.loads(sys.argv[1]))
