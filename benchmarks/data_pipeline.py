"""Input pipeline throughput: packed UL2 batches from the local corpus, tokens per second.

    python benchmarks/data_pipeline.py [--mixture=local_ul2_8k] [--sequence_length=512]
        [--batch_size=16] [--batches=200]

Prints the time to the first batch (shuffle buffers filling), the steady-state tokens/s
(decoder positions per second, padding included, and non-padding tokens per second), and the
packing figures: the fraction of non-padding tokens and of loss-bearing tokens per batch.
Compare the tokens/s with the train step's (benchmarks/README.md): the pipeline runs in
tf.data threads beside the step, so it is not the bottleneck while it is faster.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tasks import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixture", default="local_ul2_8k")
  parser.add_argument("--sequence_length", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--batches", type=int, default=200)
  args = parser.parse_args()

  start = time.perf_counter()
  ds = pipeline.get_dataset(args.mixture, args.sequence_length, args.batch_size, seed=0)
  iterator = ds.as_numpy_iterator()
  first = next(iterator)
  first_s = time.perf_counter() - start
  batches = []
  start = time.perf_counter()
  for _ in range(args.batches):
    batches.append(next(iterator))
  seconds = time.perf_counter() - start
  stats = pipeline.packing_stats([first] + batches)
  positions = args.batches * args.batch_size * args.sequence_length
  print(f"mixture {args.mixture}, sequence length {args.sequence_length}, "
        f"batch {args.batch_size}, {args.batches} batches after the first")
  print(f"first batch after {first_s:.1f} s")
  print(f"throughput: {positions / seconds:,.0f} positions/s, "
        f"{positions * stats['non_padding_fraction'] / seconds:,.0f} non-padding tokens/s")
  print(f"packing: non-padding {stats['non_padding_fraction']:.3f}, loss-bearing "
        f"{stats['loss_token_fraction']:.3f}, examples per sequence "
        f"{stats['examples_per_sequence']:.2f}")


if __name__ == "__main__":
  main()
