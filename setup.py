"""keras_sketch: memory-efficient Keras optimizers with count-sketch state.

Building also compiles the optional fused-update op (custom_ops/) against the
installed TensorFlow, with ``tf.sysconfig`` flags; it needs TensorFlow in the
build environment (``pip install --no-build-isolation .``, as
scripts/setup_env.sh does).  ``KERAS_SKETCH_BUILD_CUDA=1`` with ``nvcc`` on
the PATH also builds the CUDA kernels' C launcher library.  A failed op build
prints why and installs the package without it (pure-TF path);
``KERAS_SKETCH_REQUIRE_OP=1`` makes it an error instead.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = os.path.join("custom_ops", "sketch_update_op.cc")
CUDA = os.path.join("custom_ops", "sketch_update_kernels.cu.cc")


def _tf_flags():
    code = (
        "import tensorflow as tf;"
        "print(' '.join(tf.sysconfig.get_compile_flags()));"
        "print(' '.join(tf.sysconfig.get_link_flags()))"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env).stdout.strip().splitlines()
    return out[-2].split(), out[-1].split()


class BuildOps(build_ext):
    """Builds the op libraries with the compilers directly (g++/nvcc)."""

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            if ext.name.endswith("_sketch_ops"):
                self._build_cpu(target, [])
            elif ext.name.endswith("_sketch_ops_avx2"):
                # Loaded instead of the baseline where the CPU has AVX2+FMA
                # (runtime check in keras_sketch/fused.py); no contraction,
                # so both compute the same roundings as the TF path.
                self._build_cpu(target, ["-mavx2", "-mfma", "-ffp-contract=off"])
            else:
                self._build_cuda(target)
        except Exception as error:  # noqa: BLE001 - optional component
            message = f"keras_sketch: building {ext.name} failed, the pure-TF path will be used: {error}"
            if os.environ.get("KERAS_SKETCH_REQUIRE_OP") == "1":
                raise RuntimeError(message) from error
            print(message, file=sys.stderr)

    def _build_cpu(self, target, arch_flags):
        compile_flags, link_flags = _tf_flags()
        cxx = os.environ.get("CXX", "g++")
        cmd = [cxx, "-std=c++17", "-O3", "-fno-math-errno", "-shared", "-fPIC", *arch_flags,
               "-Wno-deprecated-declarations", "-Icustom_ops", OPS, "-o", target]
        cmd += [f for f in compile_flags if not f.startswith("--std")] + link_flags
        print("keras_sketch: " + " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=HERE)

    def _build_cuda(self, target):
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        cmd = [nvcc, "-std=c++17", "-O3", "--shared", "-Xcompiler", "-fPIC", "-cudart", "static",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-Icustom_ops", "-x", "cu", CUDA, "-o", target]
        print("keras_sketch: " + " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=HERE)


def _extensions():
    exts = [Extension("keras_sketch._sketch_ops", sources=[OPS]),
            Extension("keras_sketch._sketch_ops_avx2", sources=[OPS])]
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") or None)
    if os.environ.get("KERAS_SKETCH_BUILD_CUDA") == "1" and nvcc:
        exts.append(Extension("keras_sketch._sketch_cuda", sources=[CUDA]))
    return exts


setup(
    name="keras_sketch",
    version="0.1.0",
    description="Count-sketch compressed optimizer state for Keras 3 / TensorFlow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # keras_sketch_harness: the small harness shared by examples/ and benchmarks/ (not part of the library's API).
    packages=find_packages(include=["keras_sketch", "keras_sketch.*", "keras_sketch_harness"]),
    package_data={"keras_sketch_harness": ["wikitext2_sample/*.txt", "wikitext2_sample/README.md"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildOps},
    python_requires=">=3.10",
    install_requires=["tensorflow==2.21.0", "keras==3.15.1", "numpy>=1.26,<2.5"],
    extras_require={
        "test": ["pytest==8.3.5", "matplotlib==3.10.7", "tensorflow-datasets==4.9.10",
                 "importlib_resources==6.5.2", "psutil==7.1.3"],
    },
)
