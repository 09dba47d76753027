"""Our model implementations (transformers' modeling code is the test reference, not the runtime)."""

from adaq.models.registry import MODEL_CLASSES, build_model, load_weights

__all__ = ["MODEL_CLASSES", "build_model", "load_weights"]
