"""Flax image classifiers: ViT and ResNet families."""
