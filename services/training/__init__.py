"""Metric learning for global descriptors: losses, samplers, augmentation, model and trainer.

``losses`` and ``sampling`` are pure (tensors / arrays in, tensors / arrays out); ``model``
wraps the EfficientNet-Lite0 backbone into a trainable retrieval network; ``trainer`` runs the
training loop (:func:`services.training.trainer.run_training` is the CLI entry point).
"""
