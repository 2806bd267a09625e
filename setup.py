"""vit_jax_ft: fine-tune pretrained ViT and ResNet image classifiers in JAX/Flax."""

import setuptools

# Pinned to a set that was installed and tested together on Python 3.11 (CPU).
# Known breakages with newer or looser versions:
# - clu 0.0.12 `metrics.Std.compute` calls `jnp.clip(a_min=...)`, removed in
#   jax >= 0.10; vit_jax_ft uses only clu's metric writers and periodic
#   actions, never `clu.metrics`.
# - clu's metric writers import `tensorboard`, which tensorflow 2.21 no longer
#   pulls in, so it is listed explicitly.
# - tensorflow-datasets 4.9.10 needs `importlib_resources` without declaring it.
# - `tensorflow-cpu` keeps TF (input pipelines only) off the GPU and small.
INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "clu==0.0.12",
    "flax==0.12.8",
    "importlib_resources>=6.0",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "matplotlib>=3.8",
    "ml-collections==1.1.0",
    "numpy>=1.26,<3",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "pillow>=10.0",
    "scikit-learn==1.9.1",
    "tensorboard==2.21.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
]

# Reading Hugging Face datasets in `vit_jax_ft.data.prepare` (`--source=hf:...`, parquet,
# save_to_disk): `pip install -e '.[hf]'`. Imported only there; the rest never needs it.
# datasets 5.2.0 and what it installed beside this package's pins (pyarrow came with
# tensorflow-datasets already), pinned as they were tested together.
HF_REQUIRES = [
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
    "xxhash==4.1.0",
]

setuptools.setup(
    name="vit_jax_ft",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["vit_jax_ft", "vit_jax_ft.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # NVIDIA GPUs: the CUDA plugin matching the pinned jax (`pip install -e '.[cuda12]'`).
        # Without it, installing this package over a CUDA jax (e.g. on Colab) leaves
        # JAX on the CPU.
        "cuda12": ["jax[cuda12]==0.10.2"],
        "cuda13": ["jax[cuda13]==0.10.2"],
        "hf": HF_REQUIRES,
        "test": HF_REQUIRES + [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        # Reference implementations for the pretrained-weights parity tests
        # (the real torchvision and timm models, random weights). PyPI's
        # torchvision wheels are CUDA builds that fail to import beside a CPU
        # torch ("operator torchvision::nms does not exist"), so torch is the
        # matching CUDA build too (it runs on the CPU; ~2 min to install from
        # a local wheel cache, ~5.5 GB). timm needs torchvision. Their triton
        # must load before TensorFlow (tests/conftest.py).
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm==1.0.31",
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "scikit-image==0.26.0",  # real photos (chelsea, coffee) for the Keras ResNet50 check
        # Executing colabs/*.ipynb in tests/test_notebooks.py.
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ]},
)
