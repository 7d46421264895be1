"""omni-rt: a compiler-style inference runtime for Qwen3-Omni-30B-A3B.

A thin shim: the Python packages install as they are; the CUDA library in csrc/ is built by CMake
(CMakeLists.txt), never downloaded. Nothing GPU-only is needed to install or import omni-rt.
"""

from setuptools import find_packages, setup

setup(
    name="omni-rt",
    version="0.1.0",
    description="Streaming inference runtime for Qwen3-Omni-30B-A3B (thinker, talker, code predictor, Code2Wav)",
    packages=find_packages(include=["runtime", "runtime.*", "kernels", "kernels.*", "export", "export.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers", "soundfile", "soxr", "pillow", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest", "transformers==5.23.0", "onnx", "onnxruntime"]},
    entry_points={"console_scripts": ["omni-rt=runtime.__main__:main"]},
)
