"""Package metadata for hisd_jax."""

from setuptools import find_packages, setup

# Minimum versions are the ones the test suite was run against (2026-11).
INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.0",
    "ml-collections>=1.1.0",
    "absl-py>=2.1.0",
    "chex>=0.1.90",
    "numpy>=2.0",
    "scikit-learn>=1.5",  # ships the embedded handwritten digits
    "tensorflow-datasets>=4.9.9",  # tfds.data_source (no TensorFlow needed)
    "grain>=0.2.12",
    "matplotlib>=3.9",
    "flatbuffers>=24.3",  # jax.export serialization (hisd_jax.export)
    "tensorboardX>=2.6.2",  # TensorBoard event files without TensorFlow
    "tqdm>=4.66",  # the training progress bar
    "tokenizers>=0.22",  # BPE tokenizer of the code-search corpus (data/pycode.py)
]

setup(
    name="hisd_jax",
    version="0.1.0",
    description="Multi-exit and multitask training in JAX/Flax: HiSD, KD from converged tasks, MTL baselines.",
    packages=find_packages(include=["hisd_jax", "hisd_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8.0", "pytest-xdist>=3.5", "packaging>=24.0"]},
)
