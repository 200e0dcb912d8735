"""Optional integrations with other frameworks.

Each submodule imports its framework at import time, so import it only where that framework is installed:

- :mod:`patchblend.integrations.monai`: ``CalibratedSlidingWindowInferer``, a MONAI ``Inferer``.
- :mod:`patchblend.integrations.nnunet`: ``PatchblendPredictor``, an nnU-Net v2 ``nnUNetPredictor``.

Importing this package itself imports nothing beyond patchblend.
"""
