"""Fused SFTMix loss kernels, installed as ``sftmix_trl.kernels``.

This package depends on torch and triton only; it never imports TRL or transformers.

    from sftmix_trl.kernels import sftmix_linear_cross_entropy
    out = sftmix_linear_cross_entropy(hidden, weight, targets, mix_index, mix_lambda, mix_weight)
    out.loss.backward()
"""

if __name__ == "kernels":
    # This folder is `sftmix_trl.kernels`; it was found as a top-level `kernels` only because the repository root is
    # on sys.path (pytest, `python -m`, a script or notebook in the root). That name is Hugging Face's `kernels`
    # package, which transformers imports: load it from the rest of sys.path and leave it in this module's place
    # (an import statement returns whatever sys.modules holds under the name once this file has run).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repository_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _repository_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    from .function import SFTMixLinearCrossEntropyFunction
    from .functional import SFTMixLinearCrossEntropy, sftmix_linear_cross_entropy
    from .options import SFTMixLossOptions
    from .outputs import SFTMixLossOutput

    __all__ = [
        "SFTMixLinearCrossEntropy",
        "SFTMixLinearCrossEntropyFunction",
        "SFTMixLossOptions",
        "SFTMixLossOutput",
        "sftmix_linear_cross_entropy",
    ]
