"""A quiet console for the commands: native libraries' start-up chatter filtered from stderr.

TensorFlow (the data side) and SentencePiece log from C++ straight to file descriptor 2, before
and regardless of Python's logging: TensorFlow's "Could not find cuda drivers" and "failed call
to cuInit" on a CPU machine (TF_CPP_MIN_LOG_LEVEL cannot reach lines written before absl
initialises its logging), and SentencePiece's "precompiled_charsmap is empty" each time a
data worker loads a vocabulary (about 20 lines per evaluation); tf.data's warning that a
cached dataset was not read to its end (inference reads a few validation examples). None of
them is actionable.

`quiet_native_logs()` points fd 2 at a pipe; a thread forwards every byte to the real stderr
except whole lines that match `NOISE`. Python's own warnings, tracebacks and progress bars
pass through unchanged (partial lines are forwarded at once, so tqdm still animates). At exit
the pipe is drained before the interpreter finishes, so nothing written last is lost. Set
MOE_JAX_NATIVE_LOGS=1 to see everything.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import threading

NOISE = [re.compile(pattern) for pattern in (
    rb"^normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty",
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    rb"^[IWE]\d{4} [\d:.]+\s+\d+ (port|cudart_stub|cuda_platform|cuda_executor|"
    rb"cpu_feature_guard|cuda_dnn|cuda_fft|cuda_blas|cache_dataset_ops)\.cc:\d+\]",
)]
_installed = False


def is_noise(line: bytes) -> bool:
  return any(pattern.search(line) for pattern in NOISE)


def quiet_native_logs() -> None:
  """Filters `NOISE` lines out of this process's stderr (fd 2), once."""
  global _installed
  if _installed or os.environ.get("MOE_JAX_NATIVE_LOGS") == "1":
    return
  _installed = True
  sys.stderr.flush()
  real = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  def forward() -> None:
    pending = b""
    while True:
      chunk = os.read(read_end, 65536)
      if not chunk:
        break
      pending += chunk
      lines = pending.split(b"\n")
      pending = lines.pop()  # an unfinished line: forwarded now unless it may be noise
      out = b"".join(line + b"\n" for line in lines if not is_noise(line))
      if pending and not pending[:1] in (b"n", b"W", b"I", b"E"):
        out, pending = out + pending, b""
      if out:
        os.write(real, out)
    if pending and not is_noise(pending):
      os.write(real, pending)
    os.close(read_end)

  thread = threading.Thread(target=forward, name="quiet-native-logs", daemon=True)
  thread.start()

  def drain() -> None:
    sys.stderr.flush()
    os.dup2(real, 2)  # the pipe's last writer goes: the thread sees EOF and finishes
    thread.join(timeout=5)

  atexit.register(drain)
