"""Framework integrations on top of the public ``morphnet`` API.

- :mod:`morphnet.integrations.lightning`: ``MorphNet``, a PyTorch Lightning ``Callback``;
- :mod:`morphnet.integrations.transformers`: ``MorphNetCallback``, a Hugging Face ``TrainerCallback``.

Each module imports its framework when it is imported itself, never from here: ``import morphnet``
does not need Lightning or transformers installed. Both share :mod:`morphnet.integrations.core`,
which knows no framework.
"""
