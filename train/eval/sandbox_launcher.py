"""The sandbox launcher (see `train.eval.sandbox`): run as ``python -I -S sandbox_launcher.py CONFIG``
(the configuration dict, marshalled and hex-encoded: ``json`` would double the start-up time).

Stdlib only and few imports, as it starts once per program run: it unshares the namespaces,
forks init (pid 1 of the new PID namespace), which builds the new root and forks the candidate,
which drops its privileges, sets the limits and becomes ``python -I -c WRAPPER``.
"""

import ctypes
import marshal
import os
import resource
import signal
import sys

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
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 4096
# A read-only remount of a bind keeps these flags of its source (statvfs's ST_* values equal
# MS_*): inside a user namespace, clearing one of them is refused.
_KEPT_MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME
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


def environment(home: str) -> dict[str, str]:
  """The whole environment of a run: nothing of the caller's."""
  return {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


def _main(config: dict) -> None:
  """Unshares the namespaces, forks init, and exits with init's exit code."""
  _die_with_parent(_libc(), config["parent"])  # the caller killed: so is all of the run
  sandbox_uid = _SANDBOX_UID_BASE + os.getpid()
  user_namespace = False
  if config["isolate"]:
    try:
      user_namespace = _unshare_namespaces()
    except OSError as e:
      _setup_failed(e)
  launcher = os.getpid()
  init = os.fork()
  if init == 0:
    try:
      # As init sees it, its parent is outside its PID namespace: pid 0.
      _die_with_parent(_libc(), 0 if config["isolate"] else launcher)
      _init(config, sandbox_uid, user_namespace)
    except BaseException as e:  # noqa: BLE001 -- any failure here is a setup failure
      _setup_failed(e)
  _, status = os.waitpid(init, 0)
  os._exit(_exit_code(status))


def _init(config: dict, sandbox_uid: int, user_namespace: bool) -> None:
  """Pid 1 of the sandbox (or a subreaper): runs the candidate, kills what is left, exits."""
  libc = _libc()
  if config["isolate"]:
    _build_root(libc, config)
    home = "/tmp"
  else:
    _prctl(libc, PR_SET_CHILD_SUBREAPER, 1)  # orphans come back here to be killed
    home = config["home"]

  def time_is_up(signum, frame):
    raise TimeoutError

  signal.signal(signal.SIGALRM, time_is_up)
  init = os.getpid()
  candidate = os.fork()
  if candidate == 0:
    try:
      _exec_candidate(libc, config, home, sandbox_uid, user_namespace, init)
    except BaseException as e:  # noqa: BLE001 -- any failure before exec is a setup failure
      _setup_failed(e)
  signal.setitimer(signal.ITIMER_REAL, config["timeout"])
  try:
    _, status = os.waitpid(candidate, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    code = _exit_code(status)
  except TimeoutError:
    code = TIMED_OUT
  if not config["isolate"]:  # with a PID namespace, the kernel kills them when init exits
    _kill_descendants(candidate)
  os._exit(code)


def _unshare_namespaces() -> bool:
  """New mount, network, PID, IPC and UTS namespaces; as non-root inside a new user namespace
  where this user is root (mapped to itself outside). Returns whether it made the latter."""
  libc = _libc()
  flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
  if os.geteuid() == 0:
    _call(libc.unshare(flags), "unshare")
    return False
  uid, gid = os.geteuid(), os.getegid()
  _call(libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
  _map_ids(inside=0, outside_uid=uid, outside_gid=gid)
  return True


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
  os.mkdir(f"{root}/tmp")  # first: a Python installation under /tmp is bound inside it
  tmp_options = f"size={config['limits']['tmp_bytes']},mode=1777"
  _mount(libc, "tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
  bound = []
  for path in (*_SYSTEM_PATHS, *config["python_paths"]):
    if path != "/" and not any(path == b or path.startswith(b + "/") for b in bound):
      _bind_read_only(libc, path, root + path)
      bound.append(path)
  for name in _DEVICES:
    target = f"{root}/dev/{name}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    open(target, "w").close()
    _mount(libc, f"/dev/{name}", target, None, MS_BIND)
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
  """Binds a directory or a file read-only (a symlink is copied as a symlink); a missing one is
  skipped."""
  if os.path.islink(source):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.symlink(os.readlink(source), target)
  elif os.path.exists(source):
    if os.path.isdir(source):
      os.makedirs(target)
    else:  # a mount point for a file is a file
      os.makedirs(os.path.dirname(target), exist_ok=True)
      open(target, "w").close()
    _mount(libc, source, target, None, MS_BIND)  # not MS_REC: no writable mounts below it
    kept = os.statvfs(target).f_flag & _KEPT_MOUNT_FLAGS
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept)


def _exec_candidate(
  libc, config: dict, home: str, sandbox_uid: int, user_namespace: bool, init: int
) -> None:
  """Drops privileges, sets the limits and becomes `python -I -c _WRAPPER`."""
  os.setpgid(0, 0)  # its own group: killed as one where there is no PID namespace
  if config["isolate"]:
    try:  # as root: a uid of its own (not mapped where root is itself in a user namespace)
      if user_namespace:
        raise PermissionError("only this user is mapped")
      os.setgroups([])
      os.setgid(sandbox_uid)
      os.setuid(sandbox_uid)
    except OSError:  # a nested user namespace: an unprivileged uid, no capability after execve
      uid, gid = os.geteuid(), os.getegid()
      _call(libc.unshare(CLONE_NEWUSER), "unshare (nested user namespace)")
      _map_ids(inside=1000, outside_uid=uid, outside_gid=gid)
  # After the uid change, which clears it; without a PID namespace nothing else would kill it.
  _die_with_parent(libc, init)
  _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary gives privileges back
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
  os.execve(python, [python, "-I", "-c", _WRAPPER], environment(home))


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


def _die_with_parent(libc, parent: int) -> None:
  """SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); exits at once if it died already, before
  the prctl, as `parent` (its pid as this process sees it) is then no longer the parent."""
  _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:
    os._exit(SETUP_FAILED)


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _prctl(libc, option: int, value: int) -> None:
  """prctl(2) on Linux; elsewhere (no namespaces either) nothing."""
  if sys.platform == "linux":
    _call(libc.prctl(option, value, 0, 0, 0), f"prctl({option}, {value})")


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
  _main(marshal.loads(bytes.fromhex(sys.argv[1])))
