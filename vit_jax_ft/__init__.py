"""vit_jax_ft: fine-tune pretrained ViT and ResNet image classifiers with JAX/Flax."""

__version__ = "0.1.0"
