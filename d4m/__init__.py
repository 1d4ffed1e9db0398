"""Shared code of the D4M reimplementation: data, models, FKD augmentation, runtime helpers."""
