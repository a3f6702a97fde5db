"""ssdd-runtime packaging.

kernels/, export/ and benchmarks/ live at the top of the repository (the design card's layout) but are
installed *under* the package as ssdd_runtime.kernels / .export / .benchmarks: PyPI already has projects
called `kernels`, `export` and `benchmarks`, so a top-level module of those names is never installed.
"""
from setuptools import setup

PACKAGES = {
    "ssdd_runtime": "ssdd_runtime",
    "ssdd_runtime.integrations": "ssdd_runtime/integrations",
    "ssdd_runtime.kernels": "kernels",
    "ssdd_runtime.export": "export",
    "ssdd_runtime.benchmarks": "benchmarks",
}

EXTRAS = {
    "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
    "tensorrt": ["tensorrt>=10.0", "onnx>=1.16"],
    "bench": ["diffusers>=0.30", "matplotlib>=3.7", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
    "openvino": ["openvino>=2024.4"],
    "triton": ["triton>=3.0"],
    "diffusers": ["diffusers>=0.30"],
    "ray": ["ray[data]>=2.10", "pyarrow>=14"],
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "markdown-exec>=1.9",
             "mktestdocs>=0.2.4", "ruff"],
    # nvidia-pytriton 0.7 bundles tritonserver 2.51 (Python backend, CPU); it pins numpy<2, which only its own
    # Python side needs (ssdd serve runs the bundled server, not PyTriton): the Makefile installs it --no-deps.
    "serve": ["nvidia-pytriton>=0.7", "tritonclient[all]>=2.50"],
    # ssdd eval: the metric networks' maintained implementations. They import torchvision, whose PyPI wheels pin
    # their own torch: installed in a venv of its own (the Makefile's .venv-eval), never in `test`/`all`.
    "eval": ["torch-fidelity>=0.3", "lpips>=0.1.4", "scikit-image>=0.21", "scipy>=1.10", "torchvision"],
    "test": ["pytest>=7", "pytest-xdist>=3", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1", "diffusers>=0.30",
             "ray[data]>=2.10", "tritonclient[grpc]>=2.40", "matplotlib>=3.7", "protobuf>=4",
             "openvino>=2024.4", "datasets>=2.19", "accelerate>=0.31"],
}
EXTRAS["test"] += EXTRAS["docs"]  # the suite builds the docs site and runs its examples
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name not in ("tensorrt", "serve", "eval")
                        for req in reqs})

setup(
    name="ssdd-runtime",
    version="0.1.0",
    description="Fast, faithful inference runtime for SSDD single-step diffusion decoder image tokenizers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"ssdd_runtime": ["assets/*"], "ssdd_runtime.benchmarks": ["results/*.json"],
                  "ssdd_runtime.export": ["*.txt"]},
    install_requires=["torch>=2.3", "safetensors>=0.4", "numpy", "pillow", "huggingface-hub>=0.23", "tqdm"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ssdd=ssdd_runtime.cli:main"]},
)
