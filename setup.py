"""opd-megatron: on-policy distillation of LLMs on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="opd-megatron",
    version="0.1.0",
    description="On-policy distillation (OPD) of large language models on megatron-core, TP/PP, at pretraining scale",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["opd_megatron", "opd_megatron.*"]),
    install_requires=[
        # Any torch >= 2.6 works; install torch==2.13.0 first on CPU machines so no CUDA build is pulled.
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "PyYAML>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "httpx>=0.27",
        "numpy>=1.26",
        "psutil>=5.9",       # megatron's dist_checkpointing writer imports it without declaring it
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "matplotlib>=3.8",    # the PNG plots every OPD run writes
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "hypothesis>=6.100"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "sglang": ["httpx>=0.27", "aiohttp>=3.9"],
    },
    entry_points={"console_scripts": ["opd-megatron=opd_megatron.cli:main"]},
)
