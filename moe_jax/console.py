"""A quiet console for the commands: native libraries' start-up chatter filtered from stderr.

TensorFlow (the data side) and SentencePiece log from C++ straight to file descriptor 2, before
and regardless of Python's logging: TensorFlow's "Could not find cuda drivers" and "failed call
to cuInit" on a CPU machine (TF_CPP_MIN_LOG_LEVEL cannot reach lines written before absl
initialises its logging), its oneDNN notice, SentencePiece's "precompiled_charsmap is empty"
each time a data worker loads a vocabulary (about 20 lines per evaluation), and tf.data's
warning that a cached dataset was not read to its end (inference reads a few validation
examples). None of them is actionable. `NOISE` matches those exact messages, nothing broader:
an error from the same source files (a real CUDA failure on a GPU host) still shows.

`quiet_native_logs()` points fd 2 at a pipe read by a small child process that copies every
byte to the real stderr except whole lines matching `NOISE`. A child rather than a thread: if
this process aborts (an XLA check failure, a segfault, SIGKILL), the child still drains what
was written last, so no fatal message is lost; it ignores Ctrl-C and exits when the last
writer closes the pipe. Partial lines are forwarded at once (tqdm's bar animates), and tqdm
keeps the terminal's width through COLUMNS. Set MOE_JAX_NATIVE_LOGS=1 to see everything.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys

NOISE = (
    r"^normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty\. use identity",
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^I\d{4} [\d:.]+\s+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"^E\d{4} [\d:.]+\s+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: INTERNAL: CUDA error: "
    r"Failed call to cuInit: UNKNOWN ERROR \(303\)",
    r"^I\d{4} [\d:.]+\s+\d+ port\.cc:\d+\] oneDNN custom operations are on\.",
    r"^I\d{4} [\d:.]+\s+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^W\d{4} [\d:.]+\s+\d+ cache_dataset_ops\.cc:\d+\] The calling iterator did not fully "
    r"read the dataset being cached",
)

# The filter process: stdin is the pipe, stdout the real stderr. Whole lines are checked;
# a partial line is forwarded unless it could still become a noise line (it starts like one).
_FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = [re.compile(p.encode()) for p in sys.argv[1:]]
starts = (b"n", b"W", b"I", b"E")
def write(data):
  while data:
    try:
      data = data[os.write(1, data):]
    except OSError:  # the terminal went away: drain and drop
      return
pending = b""
while True:
  chunk = os.read(0, 65536)
  if not chunk:
    break
  lines = (pending + chunk).split(b"\n")
  pending = lines.pop()
  out = b"".join(l + b"\n" for l in lines if not any(p.search(l) for p in noise))
  if pending and pending[:1] not in starts:
    out, pending = out + pending, b""
  write(out)
if pending and not any(p.search(pending) for p in noise):
  write(pending)
"""
_installed = False


def quiet_native_logs() -> None:
  """Filters `NOISE` lines out of this process's stderr (fd 2), once; a no-op if the filter
  cannot start (stderr is then left as it was)."""
  global _installed
  if _installed or os.environ.get("MOE_JAX_NATIVE_LOGS") == "1":
    return
  _installed = True
  sys.stderr.flush()
  try:
    real = os.dup(2)
    if "COLUMNS" not in os.environ and os.isatty(real):  # tqdm sizes its bar from this
      os.environ["COLUMNS"] = str(os.get_terminal_size(real).columns)
    child = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, *NOISE],
                             stdin=subprocess.PIPE, stdout=real, stderr=real, close_fds=True)
  except OSError:
    return
  os.dup2(child.stdin.fileno(), 2)
  child.stdin.close()  # fd 2 is now the pipe's only writer in this process

  def drain() -> None:
    sys.stderr.flush()
    os.dup2(real, 2)  # the pipe's last writer goes: the child forwards the rest and exits
    try:
      child.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a subprocess of ours still holds the pipe
      pass

  atexit.register(drain)


def is_noise(line: str) -> bool:
  """Whether the filter drops `line` (for tests)."""
  import re  # pylint: disable=g-import-not-at-top
  return any(re.search(pattern, line) for pattern in NOISE)
