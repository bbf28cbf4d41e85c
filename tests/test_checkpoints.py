"""Orbax training state: keep only checkpoints whose loss was seen finite, keep K, stale tmp
dirs, corrupt files, the data fingerprint a resume checks."""

import datetime
import re
from pathlib import Path

import jax.numpy as jnp
import pytest

from train.checkpoints import (
  CHECKSUMS,
  Checkpoints,
  CorruptCheckpointError,
  NonFiniteLossError,
  check_fingerprint,
  data_fingerprint,
)
from train.config import ConfigError, load_config

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3)}
OPT_STATE = {"mu": jnp.zeros((2, 3))}


def _steps(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_keeps_k_confirmed_and_drops_those_a_nan_was_computed_on(tmp_path):
  checkpoints = Checkpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    checkpoints.save(step, PARAMS, OPT_STATE, {"step": step})
    assert step in checkpoints.unconfirmed  # its loss is not known yet
    checkpoints.check(step, 0.5)
  checkpoints.wait()
  assert _steps(tmp_path) == [2, 3]
  checkpoints.save(4, PARAMS, OPT_STATE, {"step": 4})
  checkpoints.save(5, PARAMS, OPT_STATE, {"step": 5})  # a late loss read: two unconfirmed
  with pytest.raises(
    NonFiniteLossError,
    match=r"loss is nan at step 5, computed on the weights "
    r"after step 4.*step 3, is kept",
  ):
    checkpoints.check(4, float("nan"))
  assert _steps(tmp_path) == [2, 3]


def test_a_checkpoint_is_deleted_only_once_a_newer_one_is_complete(tmp_path, monkeypatch):
  """keep=1: the save of step 2 in flight (Orbax already lists it) must not cost step 1; a
  final save that fails (a full disk) leaves the last complete checkpoint in place."""
  checkpoints = Checkpoints(tmp_path, keep=1)
  checkpoints.save(1, PARAMS, OPT_STATE, {"step": 1})
  checkpoints.check(1, 0.5)
  checkpoints.wait()
  checkpoints.save(2, PARAMS, OPT_STATE, {"step": 2})
  checkpoints.check(2, 0.5)  # confirmed, but possibly still being written
  assert 1 in _steps(tmp_path)
  checkpoints.wait()  # step 2 is complete: now step 1 goes
  assert _steps(tmp_path) == [2]

  def disk_full():
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoints.manager, "wait_until_finished", disk_full)
  with pytest.raises(OSError, match="no space left on device at"):
    checkpoints.save_final(3, PARAMS, OPT_STATE, {"step": 3})
  assert 2 in _steps(tmp_path)


def test_final_checkpoint_needs_finite_parameters(tmp_path):
  checkpoints = Checkpoints(tmp_path, keep=1)
  with pytest.raises(
    NonFiniteLossError, match="a parameter is not finite after step 7.*no checkpoint"
  ):
    checkpoints.save_final(7, {"w": PARAMS["w"].at[0, 0].set(jnp.inf)}, OPT_STATE, {"step": 7})
  assert _steps(tmp_path) == []
  checkpoints.save_final(7, PARAMS, OPT_STATE, {"step": 7})
  assert _steps(tmp_path) == [7]


def test_stale_tmp_dirs_are_removed_before_a_save_or_resume(tmp_path):
  Checkpoints(tmp_path, keep=1).save_final(2, PARAMS, OPT_STATE, {"step": 2})
  stale = tmp_path / "3.orbax-checkpoint-tmp-1234567890"
  stale.mkdir()
  (stale / "junk").write_text("half written")
  checkpoints = Checkpoints(tmp_path, keep=1)
  assert not stale.exists() and checkpoints.latest_step() == 2


@pytest.mark.parametrize("kind", ["array data", "json metadata"])
def test_a_truncated_file_is_named_as_corrupt(tmp_path, kind):
  """By its checksum; in a checkpoint saved without checksums, by Orbax's failing read."""
  Checkpoints(tmp_path, keep=1).save_final(2, PARAMS, OPT_STATE, {"step": 2})
  files = [
    p
    for p in (tmp_path / "2").rglob("*")
    if p.is_file() and (p.parent.name == "d") == (kind == "array data") and p.suffix != ".txt"
    if p.name != CHECKSUMS
  ]
  if kind == "json metadata":
    files = [max(files, key=lambda p: p.stat().st_size)]
  for path in files:
    path.write_bytes(path.read_bytes()[:10])
  names = "|".join(p.name for p in files)
  with pytest.raises(
    CorruptCheckpointError, match=rf"{tmp_path}/2 is corrupt: .*({names}): its sha256 is"
  ):
    Checkpoints(tmp_path, keep=1).restore(PARAMS, OPT_STATE)
  (tmp_path / "2" / CHECKSUMS).unlink()
  with pytest.raises(
    CorruptCheckpointError,
    match=rf"{tmp_path}/2 is corrupt or truncated: "
    rf".*({names})",
  ):
    Checkpoints(tmp_path, keep=1).restore(PARAMS, OPT_STATE)


LARGER = {"w": jnp.linspace(0, 1, 64 * 64).reshape(64, 64)}  # its data outweighs the indexes
LARGER_OPT_STATE = {"mu": jnp.zeros((64, 64))}


def _save_two_steps(directory: Path) -> Path:
  """Steps 1 and 2 (2 with other weights), one bit flipped in the middle of step 2's array
  data (its largest file); returns that file."""
  checkpoints = Checkpoints(directory, keep=2)
  checkpoints.save_final(1, LARGER, LARGER_OPT_STATE, {"step": 1})
  checkpoints.save_final(2, {"w": LARGER["w"] + 1}, LARGER_OPT_STATE, {"step": 2})
  path = max((directory / "2").rglob("*"), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))
  return path


def test_a_flipped_bit_is_a_corruption_error_naming_the_step_and_the_file(tmp_path):
  """A bit flipped in an array file loads silently without checksums; with them the restore
  names the step and the file, and the checkpoint stays."""
  flipped = _save_two_steps(tmp_path)
  with pytest.raises(CorruptCheckpointError) as error:
    Checkpoints(tmp_path, keep=2).restore(LARGER, LARGER_OPT_STATE)
  assert re.fullmatch(
    rf"checkpoint {tmp_path}/2 is corrupt: {flipped}: its sha256 is [0-9a-f]{{64}}, not "
    rf"[0-9a-f]{{64}} as saved; it is left as it is\. To resume from step 1, the checkpoint "
    r"before it, set checkpoint\.fall_back_on_corruption=true \(which moves it aside\), or "
    rf"move it out of {tmp_path}",
    str(error.value),
  )
  assert _steps(tmp_path) == [1, 2]


def test_fall_back_on_corruption_restores_the_step_before_and_keeps_the_corrupt_one(tmp_path):
  flipped = _save_two_steps(tmp_path)
  checkpoints = Checkpoints(tmp_path, keep=2, fall_back_on_corruption=True)
  assert checkpoints.read_meta() == {"step": 1}
  params, _, meta = checkpoints.restore(LARGER, LARGER_OPT_STATE)
  assert meta == {"step": 1} and (params["w"] == LARGER["w"]).all()
  (aside,) = tmp_path.glob("2.corrupt-*")
  assert (aside / flipped.relative_to(tmp_path / "2")).is_file()
  checkpoints.save_final(2, LARGER, LARGER_OPT_STATE, {"step": 2})  # the resumed run saves 2
  assert _steps(tmp_path) == [1, 2] and aside.is_dir()


def test_a_nan_loss_on_restored_weights_does_not_delete_their_checkpoint(tmp_path):
  """This run did not write the checkpoint it resumed from: a non-finite loss on it does not
  prove it bad, so it stays, and the message says how to continue from an earlier one."""
  Checkpoints(tmp_path, keep=2).save_final(2, PARAMS, OPT_STATE, {"step": 2})
  checkpoints = Checkpoints(tmp_path, keep=2)
  checkpoints.restore(PARAMS, OPT_STATE)
  with pytest.raises(
    NonFiniteLossError,
    match=rf"loss is nan at step 3, .*: stopping; checkpoint 2, which this run resumed from, "
    rf"is left in {tmp_path} .* move {tmp_path}/2 out of {tmp_path}",
  ):
    checkpoints.check(2, float("nan"))
  assert _steps(tmp_path) == [2]


def test_fingerprint_names_the_data_keys_that_change_the_rows():
  config = load_config({}, ["data.max_length=64"])
  meta = {"fingerprint": data_fingerprint(config)}
  check_fingerprint(meta, load_config({}, ["data.max_length=64", "optimizer.lr=1e-3"]), "ckpt")
  changed = load_config({}, ["data.max_length=32", "data.train_size=10"])
  with pytest.raises(ConfigError, match=r"data.max_length: 64 -> 32, data.train_size: 2000 -> 10"):
    check_fingerprint(meta, changed, "ckpt")


def test_every_seconds_saves_once_that_much_time_has_passed(tmp_path):
  checkpoints = Checkpoints(tmp_path, keep=5, every=4, every_seconds=10)
  start = datetime.datetime.now(datetime.timezone.utc)
  seconds = lambda s: start + datetime.timedelta(seconds=s)  # noqa: E731
  assert not checkpoints.due(1, now=seconds(5))
  assert checkpoints.due(2, now=seconds(11))
  assert checkpoints.due(4, now=seconds(5))  # every 4 steps, whatever the time
  checkpoints.save(2, PARAMS, OPT_STATE, {"step": 2})
  checkpoints.wait()  # a save in flight defers a time-based one
  saved = datetime.datetime.now(datetime.timezone.utc)
  later = lambda s: saved + datetime.timedelta(seconds=s)  # noqa: E731
  assert not checkpoints.due(3, now=later(5))  # counted from the last save
  assert checkpoints.due(5, now=later(11))
  assert not Checkpoints(tmp_path, keep=5, every=4).due(5, now=later(1000))  # off by default


def test_arrays_of_another_shape_are_named_not_called_corrupt(tmp_path):
  """A checkpoint without the state fingerprint (saved before it existed) still names the
  arrays that differ, and never advises deleting it."""
  Checkpoints(tmp_path, keep=1).save_final(2, PARAMS, OPT_STATE, {"step": 2})
  wider = {"w": jnp.zeros((2, 4))}
  with pytest.raises(ConfigError) as error:
    Checkpoints(tmp_path, keep=1).restore(wider, {"mu": jnp.zeros((2, 4)), "nu": jnp.zeros(3)})
  assert str(error.value) == (
    f"cannot resume from {tmp_path}/2: its arrays do not fit this run's model and optimizer "
    "(opt_state.mu: (2, 3) -> (2, 4); opt_state.nu: absent -> (3,); params.w: (2, 3) -> (2, 4)); "
    "resume with the settings it was saved with, or train into a fresh train.output_dir (the "
    "checkpoint is intact and is left as it is)"
  )
  assert _steps(tmp_path) == [2]
