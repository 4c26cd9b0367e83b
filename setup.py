"""contrastood: contrastive training for out-of-distribution detection (Winkens et al. 2020) in JAX."""
from setuptools import find_packages, setup

setup(
    name="contrastood",
    version="0.1.0",
    description="Contrastive training for improved out-of-distribution detection, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The experiment configs are the package contrastood.configs (configs/ at the top is a link to it),
    # so `--config=configs/digits.py` works from any directory and configs import each other as modules.
    packages=find_packages(include=["contrastood", "contrastood.*"]),
    # The C++ kernels' sources (oneDNN convolutions, BatchNorm sums and passes), compiled on first use (contrastood/native.py).
    package_data={"contrastood": ["kernels/*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-cpu>=2.21.0; sys_platform != 'darwin'",
        "tensorflow>=2.21.0; sys_platform == 'darwin'",  # no tensorflow-cpu wheels for macOS
        "tensorflow-datasets>=4.9.10",
        "ml_collections>=1.1.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "scikit-learn>=1.9.1",
        "scipy>=1.13",
        "matplotlib>=3.8",
        "pillow>=10",
        "tensorboard>=2.21.0",  # clu and tfds need it but do not declare it
        "importlib_resources>=6",  # likewise
        "google-cloud-storage>=2.18",  # orbax imports it for every gs:// checkpoint directory
        # oneDNN for the CPU convolutions (model.conv=auto): the OpenMP build, which needs only libgomp.
        # Newer "onednn" wheels are SYCL builds that pull in the oneAPI runtimes.
        "onednn-cpu-gomp>=2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": [
        "pytest>=8",
        "pytest-xdist>=3",
        "gcp-storage-emulator>=2026.7.19",  # a real GCS server on localhost for the gs:// workdir tests
        "cryptography>=42",  # the emulator's TLS proxy certificates (TensorFlow's GCS client needs https)
        # The PyTorch reference of benchmarks/ (and pytorch-ood's scorers, installed without its
        # torchvision dependency by the README's test command). 2.13.0 is pinned because a CPU wheel of it is
        # what package indexes without CUDA serve; a newer torch works the same.
        "torch==2.13.0",
    ]},
)
