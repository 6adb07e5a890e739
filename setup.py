"""fusedopt: fused torch.optim-compatible optimizers. The Triton kernels in kernels/ are installed
as ``fusedopt.kernels`` (never as a top-level ``kernels`` package)."""

from setuptools import setup

setup(
    name="fusedopt",
    version="0.1.0",
    description="Fused multi-tensor Adam, AdamW and RMSprop for PyTorch, with in-kernel Noam lr",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fusedopt", "fusedopt.backends", "fusedopt.kernels"],
    package_dir={"fusedopt": "fusedopt", "fusedopt.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "numpy"]},
)
