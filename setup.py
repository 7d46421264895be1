"""omni-rt: a compiler-style inference runtime for Qwen3-Omni-30B-A3B.

A thin shim: the Python packages install as they are; the CUDA library in csrc/ is built by CMake
(CMakeLists.txt), never downloaded. When nvcc, cmake and pybind11 are all present, build_ext runs CMake and
puts the pybind11 module next to runtime/cuda_ops.py (runtime/omni_rt_cuda*.so; in place for an editable
install). Otherwise (or when that build fails) the install is pure Python and says so. OMNI_RT_NO_CUDA=1
skips the CUDA build; OMNI_RT_REQUIRE_CUDA=1 makes a failed one an error.
Nothing GPU-only is needed to install or import omni-rt.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _missing_cuda_build_tools() -> list[str]:
    missing = []
    if os.environ.get("OMNI_RT_NO_CUDA") == "1":
        missing.append("OMNI_RT_NO_CUDA=1 is set")
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        missing.append("no nvcc")
    if not shutil.which("cmake"):
        missing.append("no cmake")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        missing.append("no pybind11")
    return missing


class CMakeBuild(build_ext):
    """Configure and build the `omni_rt_cuda` target of CMakeLists.txt into this extension's output path.

    A failed CUDA build is reported and the install goes on pure-Python (runtime.cuda_ops then raises
    ImportError), unless OMNI_RT_REQUIRE_CUDA=1 makes it an error.
    """

    def run(self):
        missing = _missing_cuda_build_tools()
        if missing:
            print(f"omni-rt: pure-Python install: the CUDA extension is not built ({', '.join(missing)}); "
                  "runtime.cuda_ops will raise ImportError", file=sys.stderr)
            return
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as exc:
            if os.environ.get("OMNI_RT_REQUIRE_CUDA") == "1":
                raise
            print(f"omni-rt: the CUDA extension failed to build ({exc}); pure-Python install. "
                  "Set OMNI_RT_REQUIRE_CUDA=1 to make this an error.", file=sys.stderr)

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                               f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
                               f"-DOMNI_RT_PYTHON_OUTPUT_DIR={out_dir}", "-DOMNI_RT_BUILD_EXAMPLES=OFF"])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "omni_rt_cuda",
                               "-j", str(os.cpu_count() or 1)])


setup(
    name="omni-rt",
    version="0.1.0",
    description="Streaming inference runtime for Qwen3-Omni-30B-A3B (thinker, talker, code predictor, Code2Wav)",
    packages=find_packages(include=["runtime", "runtime.*", "kernels", "kernels.*", "export", "export.*"]),
    ext_modules=[Extension("runtime.omni_rt_cuda", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers", "soundfile", "soxr", "pillow", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest", "transformers==5.23.0", "onnx", "onnxruntime"],
                    "scale": ["ray[serve]==2.60.0"]},  # runtime/serve/scale.py (requirements-scale.txt)
    entry_points={"console_scripts": ["omni-rt=runtime.__main__:main"]},
)
