"""Trainer callbacks that drive a :class:`~normprobe.Monitor` from a training framework's step.

- :mod:`normprobe.integrations.lightning`: a PyTorch Lightning ``Callback``
  (``pip install "normprobe[lightning]"``).
- :mod:`normprobe.integrations.huggingface`: a Hugging Face ``transformers``
  ``TrainerCallback`` (``pip install "normprobe[huggingface]"``).

Each lives in its own module, imported only by who uses it, so normprobe
itself needs neither framework.
"""
