"""moe_jax: sparse Mixture-of-Experts language models in JAX/Flax."""
import setuptools

# Lower bounds are the versions verified on the project's CPU machines (Python 3.11).
CORE = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "gin-config>=0.5.0",
    "numpy>=2.0",
]
# Hugging Face checkpoints (moe_jax/interop): reading/writing safetensors needs only
# safetensors; transformers and (CPU) torch are for the tests that compare against them.
# torch is pinned exactly: 2.13.0 is the CPU wheel these machines carry, where a range would
# pull the newest CUDA build (several GB).
INTEROP = ["safetensors>=0.8", "transformers>=5.24", "torch==2.13.0"]
# The data side (tasks/) only; the core never imports these. seqio pulls tensorflow-text and
# with it TensorFlow (CPU is enough: tf.data only). rdata and pysword read two corpus sources
# (an R data file, SWORD Bible modules). The training loop (moe_jax/trainer.py) needs the data
# side, clu with tensorboard (TensorBoard event files) and tqdm (progress bar).
DATA = ["clu>=0.0.12", "tensorboard>=2.20", "tqdm>=4.66", "seqio>=0.0.20",
        "tensorflow-datasets>=4.9.10", "sentencepiece>=0.2.1", "rdata>=1.0",
        "pysword>=0.2.8",
        "importlib_resources>=6.0"]  # tfds reads its own package files with it
# Routing analysis tables and plots (moe_jax/analysis imports them only when asked), and what
# the tests need to execute the notebooks. Lower bounds loose enough for Colab's runtime.
ANALYSIS = ["matplotlib>=3.8", "pandas>=2.2"]
NOTEBOOKS = ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"]
EXTRAS = {
    "test": ["pytest>=8.0", "pytest-xdist>=3.5"] + INTEROP + DATA + ANALYSIS + NOTEBOOKS,
    "analysis": ANALYSIS,
    "notebooks": DATA + ANALYSIS + NOTEBOOKS,
    "interop": INTEROP,
    "data": DATA,
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts language models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*", "tasks", "tasks.*"]),
    package_data={"tasks": ["vocabularies/*.model"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
