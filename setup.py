from pathlib import Path

from setuptools import setup

about: dict = {}
exec((Path(__file__).parent / "openclip_lite" / "version.py").read_text(), about)  # noqa: S102 (the version without importing torch)

extras = {
    "index": ["faiss-cpu>=1.8"],
    "serve": ["fastapi>=0.110", "pydantic>=2", "uvicorn>=0.29", "python-multipart>=0.0.9"],
    "ray": ["ray[data]>=2.51", "pyarrow>=14"],
    # pymilvus' own [milvus_lite] extra admits old milvus-lite releases whose files 3.x cannot open
    "milvus": ["pymilvus>=3,<4", "milvus-lite>=3"],
    "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})
extras["test"] = extras["all"] + [
    "pytest>=8",
    "pytest-timeout>=2",
    "hypothesis>=6",
    # the reference implementations the tests compare against
    "clip-anytorch==2.6.0",
    "setuptools<81",  # clip-anytorch imports pkg_resources
    "open_clip_torch>=2.24",
    "selenium==4.51.*",
    "ruff>=0.5",
]

setup(
    name="openclip-lite",
    version=about["__version__"],
    description="OpenAI's CLIP models in pure PyTorch: identical numbers, faster, with zero-shot and search",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["openclip_lite"],
    package_data={"openclip_lite": ["bpe_simple_vocab_16e6.txt.gz", "py.typed", "static/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "ftfy>=6.1",
        "regex",
        "pillow>=9",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "tqdm",
        "filelock>=3",
        "numpy",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["openclip-lite = openclip_lite.cli:main"]},
)
