"""Fused SFTMix loss kernels, installed as ``sftmix_trl.kernels``.

This package depends on torch and triton only; it never imports TRL or transformers.
"""
