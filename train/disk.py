"""A full disk, reported with the path being written (and the space it needs).

Python's `[Errno 28] No space left on device` names no path, and Orbax and TensorStore
re-wrap it as text; `disk_errors` turns either into an `OSError(ENOSPC)` that names the path,
and, where the caller knows it, how much it writes against how much is free there.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path


def no_space(error: BaseException | None) -> bool:
  """Whether ENOSPC is anywhere in the chain (Orbax and TensorStore re-wrap it as text)."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(n: int) -> str:
  for unit in ("bytes", "kB", "MB", "GB", "TB"):
    if n < 1000 or unit == "TB":
      return f"{n} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
    n /= 1000


def _free_bytes(path: Path) -> int:
  """Free bytes on the file system of `path`, or of its closest existing parent."""
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free


@contextlib.contextmanager
def disk_errors(path, needed: int | None = None):
  """Re-raises a full disk met inside as `OSError(ENOSPC)` naming `path`.

  With `needed` (the bytes the block writes) the message also gives the bytes free on
  that file system, measured once the block has cleaned up after itself.
  """
  try:
    yield
  except Exception as e:
    if not no_space(e):
      raise
    message = f"no space left on device at {path}"
    if needed is not None:
      free = _free_bytes(Path(path))
      message += f": it needs {_size(needed)}, {_size(free)} are free on that file system"
    raise OSError(errno.ENOSPC, message) from e
