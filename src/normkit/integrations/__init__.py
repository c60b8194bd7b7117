"""Integrations with third-party libraries; each submodule imports its library only when imported itself.

* :mod:`normkit.integrations.transformers` — :func:`apply_normkit` and
  :func:`patch_transformers_classes` for Hugging Face ``transformers`` models (``pip install normkit[hf]``).
"""
