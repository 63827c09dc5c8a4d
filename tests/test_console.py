"""The commands' console filter (moe_jax/console.py): native start-up chatter goes, nothing
else does — not a real CUDA error, not the last words of a process that aborts."""
import subprocess
import sys

from moe_jax import config, console

NOISE = [
    "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796636040.935764   26835 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796636045.266422   26835 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796636040.935435   26835 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results",
]
KEPT = [
    "E0000 00:00:1796636045.266422   26835 cuda_dnn.cc:52] Could not create cudnn handle",
    "E0000 00:00:1796636045.266422   26835 cuda_platform.cc:52] failed call to cuInit: "
    "CUDA_ERROR_OUT_OF_MEMORY",
    "WARNING checkpoint step 24 failed to restore",
    "Traceback (most recent call last):",
]


def test_only_the_known_noise_is_dropped():
  assert all(console.is_noise(line) for line in NOISE)
  assert not any(console.is_noise(line) for line in KEPT)


def test_a_process_that_aborts_keeps_its_last_words():
  script = ("from moe_jax import console; console.quiet_native_logs()\n"
            "import os, sys\n"
            f"for line in {NOISE + KEPT[:1]!r}: sys.stderr.write(line + '\\n')\n"
            "sys.stderr.flush(); os.write(2, b'F0000 fatal: check failed\\n'); os.abort()\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=config.REPO_ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode != 0
  assert out.stderr.splitlines() == [KEPT[0], "F0000 fatal: check failed"], out.stderr
