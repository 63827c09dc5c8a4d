raise ImportError("the core and benchmarks/accelerator.py must run without tensorflow")
