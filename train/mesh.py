"""Multi-host start-up, the (data, fsdp, tensor) device mesh and parameter/batch shardings."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import Config, ConfigError, MeshConfig, to_dict
from train.models.decoder import BATCH as BATCH_AXES
from train.models.decoder import SplitModel, fit_spec

MESH_AXES = ("data", "fsdp", "tensor")


def _launched_multi_host() -> bool:
  """True when a launcher set the environment jax.distributed reads."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
    return True
  return (
    int(os.environ.get("SLURM_NTASKS", "1")) > 1
    or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )


def initialize_distributed(cfg: MeshConfig) -> bool:
  """Calls `jax.distributed.initialize` when the config or the launch asks for it.

  Must run before anything touches a JAX device. Returns whether it did.
  """
  wanted = cfg.distributed == "true" or (
    cfg.distributed == "auto" and (cfg.coordinator_address is not None or _launched_multi_host())
  )
  if not wanted:
    return False
  # CPU processes exchange collectives over gloo (tests, CPU clusters); GPU/TPU ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  with _StartupWatch(cfg):
    jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      initialization_timeout=cfg.initialization_timeout,
    )
  return True


# The start-up watch reports this long (at most a fifth of the timeout) before jax's own
# deadline, which aborts the process with a C++ stack.
_REPORT_BEFORE_S = 5.0


class _StartupWatch:
  """Stops the process with a line naming the coordinator, the missing processes and
  `mesh.initialization_timeout` when `jax.distributed.initialize` has not returned shortly
  before that timeout: after it, jax aborts the process (SIGABRT) with only a C++ stack.

  The missing processes are found by a roll call beside jax's: while they wait, process 0
  listens on the coordinator's port + 1 and every other process reports its id there. Where
  that cannot happen (the port is taken; the address or the ids come from the launcher's
  environment) the line says what is known.
  """

  def __init__(self, cfg: MeshConfig):
    self.cfg = cfg
    self.finished = threading.Event()
    self.reported: set[int] = set()  # process 0: the ids that answered the roll call
    self.reached = False  # another process: whether process 0's roll call took its report
    self.roll_call_error: str | None = None
    timeout = cfg.initialization_timeout
    self.timer = threading.Timer(timeout - min(_REPORT_BEFORE_S, timeout / 5), self._give_up)
    self.timer.daemon = True

  def __enter__(self):
    cfg = self.cfg
    host, _, port = (cfg.coordinator_address or "").rpartition(":")
    if port.isdigit() and None not in (cfg.num_processes, cfg.process_id):
      address = (host.strip("[]"), int(port) + 1)
      roll_call = self._listen if cfg.process_id == 0 else self._report
      threading.Thread(target=roll_call, args=(address,), daemon=True).start()
    self.timer.start()
    return self

  def __exit__(self, *exc_info):
    self.timer.cancel()
    self.finished.set()

  def _listen(self, address: tuple[str, int]) -> None:
    try:
      if socket.has_dualstack_ipv6():  # as jax's service, on every interface
        server = socket.create_server(
          ("::", address[1]), family=socket.AF_INET6, dualstack_ipv6=True
        )
      else:
        server = socket.create_server(("", address[1]))
    except OSError as e:
      self.roll_call_error = f"port {address[1]}: {e.strerror}"
      return
    with server:
      server.settimeout(0.2)  # to see `finished`
      while not self.finished.is_set():
        try:
          connection, _ = server.accept()
          with connection:
            connection.settimeout(1)
            self.reported.add(int(connection.recv(32)))
        except (OSError, ValueError):  # nothing yet, or not a report
          continue

  def _report(self, address: tuple[str, int]) -> None:
    while not self.finished.is_set():
      try:
        with socket.create_connection(address, timeout=1) as connection:
          connection.sendall(f"{self.cfg.process_id}\n".encode())
        self.reached = True
        return
      except OSError:  # process 0 is not listening (yet)
        self.finished.wait(0.2)

  def _give_up(self) -> None:
    cfg = self.cfg
    coordinator = (
      f"the coordinator at {cfg.coordinator_address}"
      if cfg.coordinator_address
      else "the coordinator (from the launcher's environment)"
    )
    if cfg.num_processes is None or cfg.process_id is None:
      missing = f"not every process connected to {coordinator}"
    elif cfg.process_id == 0 and self.roll_call_error:
      missing = (
        f"not every process connected to {coordinator}, and which did not is unknown: "
        f"no roll call ({self.roll_call_error})"
      )
    elif cfg.process_id == 0:
      absent = sorted(set(range(1, cfg.num_processes)) - self.reported)
      missing = (
        f"processes {absent} did not report to {coordinator}"
        if absent
        else f"every process reported, but not all connected to {coordinator}: "
        "can every host reach its port?"
      )
    elif self.reached:
      missing = (
        f"process 0 ({coordinator}) is up, but other processes did not report: its line names them"
      )
    else:
      missing = (
        f"process 0 ({coordinator}) did not answer: it has not started, or the address is wrong"
      )
    whom = "" if cfg.process_id is None else f" (process {cfg.process_id} of {cfg.num_processes})"
    message = (
      f"error: the processes of this run did not all start within "
      f"mesh.initialization_timeout={cfg.initialization_timeout} s{whom}: {missing}; start "
      "every process (the same command, each with its own mesh.process_id), or raise "
      "mesh.initialization_timeout"
    )
    # The main thread is blocked in jax's C++ start-up: nothing but an exit ends it.
    sys.stdout.flush()
    os.write(2, f"\n{message}\n".encode())
    os._exit(1)


# Config keys that differ between the processes of one run by design.
PER_PROCESS_KEYS = ("mesh.process_id",)


def check_same_config(config: Config) -> None:
  """Raises `ConfigError` on every process, naming the keys and the processes, unless all
  processes of the run were given the same config (a difference would hang them later, in
  collectives that no longer match). A collective: every process calls it at start-up."""
  if jax.process_count() == 1:
    return
  mine = {k: v for k, v in _flat(to_dict(config)).items() if k not in PER_PROCESS_KEYS}
  blob = np.frombuffer(json.dumps(mine, sort_keys=True, default=str).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(blob.size))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: blob.size] = blob
  gathered = multihost_utils.process_allgather(padded)
  configs = [json.loads(bytes(row[:size])) for row, size in zip(gathered, sizes)]
  keys = {k for c in configs for k in c}
  differing = sorted(k for k in keys if any(c.get(k) != configs[0].get(k) for c in configs))
  if not differing:
    return
  shown = "; ".join(
    f"{key}: " + ", ".join(f"process {i} {c.get(key)!r}" for i, c in enumerate(configs))
    for key in differing
  )
  raise ConfigError(
    f"the {len(configs)} processes of this run were given different configs ({shown}); "
    "give every process the same config and overrides (only mesh.process_id differs)"
  )


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"section.key": value} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _flat(value, f"{prefix}{key}.")
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def mesh_sizes(cfg: MeshConfig, count: int) -> dict[str, int]:
  """``{"data", "fsdp", "tensor"}`` sizes of `cfg` over `count` devices, a -1 axis filled; the
  data axis counts every slice's (`cfg.slices`)."""
  if count % cfg.slices:
    raise ValueError(f"mesh.slices={cfg.slices} does not divide the {count} devices")
  sizes = _slice_sizes(cfg, count // cfg.slices)
  return sizes | {"data": sizes["data"] * cfg.slices}


def _slice_sizes(cfg: MeshConfig, count: int) -> dict[str, int]:
  """The axes' sizes inside one slice of `count` devices."""
  sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
  fill = [name for name, size in sizes.items() if size == -1]
  known = math.prod(size for size in sizes.values() if size != -1)
  if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh {sizes}: sizes must be >= 1, with at most one -1 (fill)")
  if fill:
    if count % known:
      raise ValueError(f"mesh {sizes}: {known} does not divide the {count} devices")
    sizes[fill[0]] = count // known
  if math.prod(sizes.values()) != count:
    raise ValueError(
      f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are "
      f"{count}; set one axis to -1 to fill"
    )
  return sizes


def batch_shards(sizes: dict[str, int]) -> int:
  """How many parts a batch's rows split into: the product of the batch axes (data x fsdp)
  of a mesh of `sizes` (`mesh_sizes`, or a `Mesh`'s shape)."""
  return math.prod(sizes[axis] for axis in BATCH_AXES)


def check_micro_batch(micro_batch_size: int, sizes: dict[str, int], devices: str) -> None:
  """Raises `ConfigError` unless a micro-batch's rows split evenly over the batch axes
  (data x fsdp) of a mesh of `sizes` (`mesh_sizes`, or a `Mesh`'s shape) over `devices`."""
  shards = batch_shards(sizes)
  if micro_batch_size % shards:
    raise ConfigError(
      f"train.micro_batch_size={micro_batch_size} does not divide over mesh data x fsdp = "
      f"{shards} (mesh {dict(sizes)} over {devices}): make it a multiple of {shards}, or "
      "move devices to mesh.tensor"
    )


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes,
  or e.g. the chips of a TPU topology for ahead-of-time compilation); one axis may be -1 (fill).

  With `cfg.slices` > 1 the data axis runs over the slices first (its outer factor crosses
  the data-center network), as MaxText's hybrid mesh does; each slice keeps its own layout.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_sizes(cfg, len(devices))
  # Auto axes: shardings are given to jit explicitly and XLA propagates the rest.
  auto = (jax.sharding.AxisType.Auto,) * 3
  if cfg.slices == 1:
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices, axis_types=auto)
  in_slice = _slice_sizes(cfg, len(devices) // cfg.slices)
  tpu_slices = {getattr(d, "slice_index", None) for d in devices} - {None}
  by_process = len(tpu_slices) != cfg.slices  # CPU and GPU devices: a process is a slice
  granules = {d.process_index for d in devices} if by_process else tpu_slices
  if len(granules) != cfg.slices:
    raise ValueError(
      f"mesh.slices={cfg.slices}, but the {len(devices)} devices come from {len(granules)} "
      + ("processes" if by_process else "slices")
    )
  grid = mesh_utils.create_hybrid_device_mesh(
    tuple(in_slice.values()),
    (cfg.slices, 1, 1),
    devices,
    process_is_granule=by_process,
    allow_split_physical_axes=True,
  )
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def to_host(value: jax.Array) -> np.ndarray:
  """The whole array on this host; for an array spread over several processes a collective
  (every process must call it, in the same order)."""
  if value.is_fully_addressable:
    return np.asarray(value)
  return multihost_utils.process_allgather(value, tiled=True)


def batch_sharding(mesh) -> NamedSharding:
  """[accumulation, micro-batch, length]: micro-batch rows split over data and fsdp."""
  return NamedSharding(mesh, P(None, BATCH_AXES, None))


def rows_sharding(mesh) -> NamedSharding:
  """[rows, length] (the eval steps' input): rows split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(params: nnx.State, mesh) -> dict:
  """NamedShardings from the parameters' partitioning metadata, as a pure dict.

  Works on abstract (`nnx.eval_shape`) or concrete parameters; an axis that
  does not divide its dimension (e.g. an odd vocabulary) is dropped, as the
  checkpoint loader does.
  """

  def sharding(variable):
    spec = variable.get_metadata().get("out_sharding") or ()
    return NamedSharding(mesh, fit_spec(spec, variable.shape, mesh))

  return nnx.to_pure_dict(
    jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  )


def shard_model(model: nnx.Module, mesh) -> SplitModel:
  """`model` split, its parameters placed on `mesh` by their sharding metadata."""
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  shardings = param_shardings(state, mesh)
  return SplitModel(graphdef, jax.device_put(nnx.to_pure_dict(state), shardings), rest, shardings)
