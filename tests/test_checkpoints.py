"""moe_jax.checkpoints: resharding restore, retention, and surviving a save killed mid-write."""
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import train_step as ts
from moe_jax.checkpoints import Checkpointer

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
WRITER = os.path.join(HELPERS, "checkpoint_writer.py")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
KILL_AFTER_BYTES = 16 * 2**20


def _load_writer():
  """The writer script, imported for its make_state/make_data: one definition of the values."""
  spec = importlib.util.spec_from_file_location("checkpoint_writer", WRITER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


writer = _load_writer()


def _train_state():
  """A real TrainState: flax struct dataclass, adamw's NamedTuple states, an `extra` collection.

  One optimizer update makes mu/nu/count non-zero, so a restore that mixed up leaves would show.
  """
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  variables = {
      "params": {"dense": {"kernel": jax.random.normal(keys[0], (16, 32)),
                           "bias": jax.random.normal(keys[1], (32,))},
                 "experts": {"wi": jax.random.normal(keys[2], (8, 16, 24), jnp.bfloat16)}},
      "moe_balance": {"bias": jax.random.normal(keys[3], (8,))},
  }
  optimizer = optax.adamw(1e-2)
  state = ts.TrainState.create(variables, optimizer)
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return state.replace(step=jnp.asarray(7, jnp.int32),
                       params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def _source_spec(x):
  """On the (8,) mesh: shard the leading dim when it divides, else replicate."""
  return P("data") if x.ndim and x.shape[0] % 8 == 0 else P()


def _target_spec(x):
  """On the (2, 4) mesh: different axes and dims from the source layout."""
  if x.ndim == 3:
    return P("model", "data", None)   # (8, 16, 24)
  if x.ndim == 2:
    return P(None, "model")           # (16, 32)
  if x.ndim == 1 and x.shape[0] == 32:
    return P(("data", "model"))
  if x.ndim == 1:
    return P("model")                 # (8,)
  return P()


def _leaves_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_reshards_onto_another_mesh(tmp_path):
  mesh8 = jax.make_mesh((8,), ("data",))
  mesh24 = jax.make_mesh((2, 4), ("data", "model"))
  state = _train_state()
  state = jax.device_put(state, jax.tree.map(lambda x: NamedSharding(mesh8, _source_spec(x)),
                                             state))
  expected = jax.tree.map(np.asarray, state)
  data = {"batches_consumed": 123, "seed": 0, "mixture": "ul2"}

  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=True)
  assert ckpt.save(7, state, data)
  # save() returns once arrays are on host: the training loop may donate them right away.
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait()
  assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]

  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=NamedSharding(mesh24, _target_spec(x))),
      expected)
  restored, restored_data = ckpt.restore(abstract)
  ckpt.close()

  assert isinstance(restored, ts.TrainState)
  assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
  _leaves_equal(restored, expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding
  assert restored_data == data


def test_restore_errors(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "empty"), async_save=False)
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32,
                                        sharding=NamedSharding(jax.make_mesh((8,), ("d",)), P()))}
  with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
    ckpt.restore(abstract)
  ckpt.save(1, {"w": jnp.ones(4)}, {})
  with pytest.raises(FileNotFoundError, match=r"committed steps: \[1\]"):
    ckpt.restore(abstract, step=2)
  with pytest.raises(ValueError, match="sharding"):
    ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  with pytest.raises(TypeError):  # not JSON: refused before anything is written
    ckpt.save(2, {"w": jnp.ones(4)}, {"rng": object()})
  assert ckpt.all_steps() == [1]
  ckpt.close()


@pytest.mark.parametrize("keep_last,keep_every,expected,expected_after", [
    (3, None, [8, 9, 10], [10, 11, 12]),
    (2, 4, [4, 8, 9, 10], [4, 8, 11, 12]),
])
def test_retention(tmp_path, keep_last, keep_every, expected, expected_after):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, keep_last=keep_last, keep_every_steps=keep_every,
                      async_save=False)
  for step in range(1, 11):
    assert ckpt.save(step, {"w": jnp.full((4,), step)}, {"batches_consumed": step})
  assert not ckpt.save(10, {"w": jnp.zeros(4)}, {})   # not past the latest step: skipped
  assert ckpt.all_steps() == expected and ckpt.latest_step() == 10
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == expected
  ckpt.close()

  # A new run on the same directory applies the policy to the steps it finds there.
  ckpt = Checkpointer(directory, keep_last=keep_last, keep_every_steps=keep_every,
                      async_save=True)
  assert ckpt.all_steps() == expected
  for step in (11, 12):
    assert ckpt.save(step, {"w": jnp.full((4,), step)}, {"batches_consumed": step})
  ckpt.wait()
  assert ckpt.all_steps() == expected_after
  ckpt.close()


def _abstract(state):
  replicated = NamedSharding(jax.make_mesh((8,), ("data",)), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def _check_step(ckpt, step, big_mb):
  want = writer.make_state(step, big_mb)
  got, data = ckpt.restore(_abstract(want), step=step)
  _leaves_equal(got, want)
  assert data == writer.make_data(step)


def _bytes_under(path):
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except FileNotFoundError:  # renamed or replaced while we looked
        pass
  return total


def _write_and_kill(directory, big_mb, log_path):
  """Runs the writer and SIGKILLs it while its step-2 async save is being written.

  Returns (mid_write, latest): whether step 2 was still uncommitted after the kill, and the
  writer's latest_step() printed just before it.
  """
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, WRITER, directory, str(big_mb)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
  watchdog = threading.Timer(120, proc.kill)
  watchdog.start()
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line.strip())
      if line.startswith("SAVING 2"):
        # Kill once part of the array data is on disk, so the kill lands mid-write rather
        # than before the first byte (or as soon as the step commits, if the disk is fast).
        tmp_dir = os.path.join(directory, "2" + TMP_SUFFIX)
        deadline = time.monotonic() + 30
        while (_bytes_under(tmp_dir) < KILL_AFTER_BYTES and os.path.isdir(tmp_dir)
               and time.monotonic() < deadline):
          time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        break
    proc.wait()
  finally:
    watchdog.cancel()
  with open(log_path) as log:
    assert lines and lines[-1].startswith("SAVING 2"), (
        f"writer stopped early: {lines}\n{log.read()[-3000:]}")
  assert proc.returncode == -signal.SIGKILL
  latest = lines[-1].split("latest_step=")[1]
  return not os.path.isdir(os.path.join(directory, "2")), latest


def test_save_killed_mid_write_keeps_previous_checkpoint(tmp_path):
  # 200 MiB takes about a second to write on a 2-core VM and the kill comes after the first
  # 16 MiB; if a fast disk still commits first, retry bigger.
  for attempt, big_mb in enumerate((200, 800)):
    directory = str(tmp_path / f"ckpt{attempt}")
    mid_write, latest_during_save = _write_and_kill(directory, big_mb,
                                                    tmp_path / f"writer{attempt}.log")
    if mid_write:
      break
  leftovers = sorted(os.listdir(directory))
  partial = _bytes_under(os.path.join(directory, "2" + TMP_SUFFIX))
  print(f"\nkill landed mid-write: {mid_write} ({big_mb} MiB state, {partial / 2**20:.0f} MiB "
        f"written); directory after kill: {leftovers}")

  ckpt = Checkpointer(directory, keep_last=1, async_save=True)
  if mid_write:
    # Step 2 was uncommitted even after the kill, so also when the writer asked.
    assert latest_during_save == "1"
    assert "2" + TMP_SUFFIX in leftovers and partial > 0   # the partial write is there...
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]   # ...and ignored
    _check_step(ckpt, 1, writer.SMALL_MB)
    # Saving the same step again after the crash works (the stale tmp dir is cleaned up).
    assert ckpt.save(2, writer.make_state(2, writer.SMALL_MB), writer.make_data(2))
    ckpt.wait()
    assert ckpt.all_steps() == [2]
    _check_step(ckpt, 2, writer.SMALL_MB)
  else:
    warnings.warn(f"the {big_mb} MiB save committed before the kill: mid-write case not hit")
    # Killed after the commit; step 1 survives if the kill beat its deletion.
    assert ckpt.latest_step() == 2 and ckpt.all_steps() in ([2], [1, 2])
    for step in ckpt.all_steps():
      _check_step(ckpt, step, writer.SMALL_MB if step == 1 else big_mb)
    assert ckpt.save(3, writer.make_state(3, writer.SMALL_MB), writer.make_data(3))
    ckpt.wait()
    assert ckpt.all_steps() == [3]
  ckpt.close()
  assert not [n for n in os.listdir(directory) if TMP_SUFFIX in n]
