"""Training and export (needs the ``train`` extra: scikit-learn, onnx)."""
