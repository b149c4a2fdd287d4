"""brivl-ds: a DeepSpeed trainer for BriVL (WenLan) two-tower image-text models.

Two import packages ship from this repository:
  brivl_ds       the model, cross-modal MoCo, the trainer and the data path (folder brivl_ds/)
  brivl_kernels  fused Triton kernels (folder kernels/; the bare name `kernels` is taken on PyPI)

Install torch first (see README): DeepSpeed's sdist imports torch in its setup.
"""
from setuptools import setup

INDEX = ["faiss-cpu"]  # vector index (a faiss-gpu build can replace it)
SERVE = ["fastapi", "uvicorn", "prometheus-client", *INDEX]
ZEROSHOT = ["matplotlib"]  # the zero-shot confusion matrix picture
INFERENCE = sorted({*SERVE, *INDEX, *ZEROSHOT})

setup(
    name="brivl-ds",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 trainer for BriVL two-tower image-text models with cross-modal MoCo",
    python_requires=">=3.10",
    packages=[
        "brivl_ds",
        "brivl_ds.models",
        "brivl_ds.moco",
        "brivl_ds.data",
        "brivl_ds.parallel",
        "brivl_ds.construction",
        "brivl_ds.memory",
        "brivl_ds.resilience",
        "brivl_ds.checkpointing",
        "brivl_ds.training",
        "brivl_ds.serving",
        "brivl_ds.evaluation",
        "brivl_ds.inference",
        "brivl_ds.bench",
        "brivl_kernels",
    ],
    package_dir={"brivl_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.19.3",  # ZeRO-3 with frozen parameters inside checkpointed blocks (DeepSpeed PR 8148)
        "transformers>=5.23",  # the per-module init replay (construction/init_replay.py) uses transformers 5's init API
        "timm>=1.0",
        "megatron-core>=0.12",
        "pyarrow>=15",
        "tensorboard",
        "safetensors",  # exported models (brivl_ds/inference/exported.py)
        "triton",
        "tqdm",
        "pillow",
        "numpy",
    ],
    # After training: a training node needs none of these. A command that needs a missing one says which extra
    # installs it (brivl_ds/optional_deps.py).
    extras_require={
        "serve": SERVE,  # python -m brivl_ds.serve (its search uses the vector index)
        "index": INDEX,  # python -m brivl_ds.index
        "zeroshot": ZEROSHOT,  # python -m brivl_ds.zeroshot
        "inference": INFERENCE,
        "test": ["pytest", "hypothesis", "httpx", *INFERENCE],  # the suite covers every command
    },
)
