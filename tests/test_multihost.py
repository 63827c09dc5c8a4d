"""2 processes × 4 CPU devices with jax.distributed (gloo) train like 1 process × 8 devices."""
import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "helpers", "distributed_worker.py")


def run_workers(num_processes, devices_per_process):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(num_processes):
    env = dict(os.environ, MOE_JAX_COORDINATOR=f"localhost:{port}",
               MOE_JAX_NUM_PROCESSES=str(num_processes), MOE_JAX_PROCESS_ID=str(i),
               JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    procs.append(subprocess.Popen([sys.executable, WORKER], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  line = [l for l in outs[0][0].splitlines() if l.startswith("LOSSES ")][0]
  return json.loads(line[len("LOSSES "):])


@pytest.mark.slow
def test_two_processes_match_one():
  one = run_workers(1, 8)
  two = run_workers(2, 4)
  assert (one["processes"], one["devices"]) == (1, 8)
  assert (two["processes"], two["devices"]) == (2, 8)
  assert two["rows"] == [0, 4]  # process 0 feeds half of the batch
  assert len(two["losses"]) == 3 and two["losses"][2] < two["losses"][0]
  for a, b in zip(one["losses"], two["losses"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)
