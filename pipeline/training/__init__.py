"""Training: models, the step (schedule, batch order, loss), the trainer, sharpness tracking, and checkpoints.

- :mod:`~pipeline.training.models`: the MLP and the ResNet20 family (with and without skip connections).
- :mod:`~pipeline.training.steps`: the learning-rate schedule, seeded batch order, the loss, evaluation.
- :mod:`~pipeline.training.trainer`: seeded, deterministic, resumable training.
- :mod:`~pipeline.training.tracking`: λmax and the quadratic model of a step during training (edge of stability).
- :mod:`~pipeline.training.checkpoints`: the one owner of the checkpoint format, the manifest and verified reading.

The sources of this wing (with ``data`` and ``repro``) make the run fingerprint that a resumed checkpoint must match
(:func:`pipeline.provenance.code_fingerprint`).
"""
