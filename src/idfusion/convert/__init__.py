"""Converters between official checkpoint formats and idfusion's diffusers-style modules.

Each release's key map lives in one module here, apart from the model pieces in :mod:`idfusion.methods`:
:mod:`.flashface` (the official ``flashface.ckpt``, CLIP and VAE files, and the open release's folder) and
:mod:`.feedface` (UniDiffuser-v1's U-ViT, VAE and caption decoder). ``idfusion convert`` calls the ``convert_*``
functions named in the method registry.
"""
