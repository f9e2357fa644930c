"""SpectralKD with a cached teacher, from Python: the cache in your own training loop.

::

    import spectralkd

    spectralkd.run("pipeline.yaml", "extract")          # the teacher, once
    cache = spectralkd.open_cache("pipeline.yaml")      # checked: fingerprint, digests, checksums
    ds = spectralkd.CacheDataset(cache, layers=[6, 7], widths=192)
    loss = spectralkd.SpectralKDLoss(kind="spectral")

The command line (``spectralkd`` or ``python -m pipeline``) runs the same stages.
"""

from pipeline import __version__
from pipeline.config import ConfigError, PipelineConfig
from pipeline.errors import PipelineError

from .api import layer_pairs, load, open_cache, run, status
from .data import CacheDataset
from .losses import SpectralKDLoss

__all__ = ["CacheDataset", "ConfigError", "PipelineConfig", "PipelineError", "SpectralKDLoss", "__version__",
           "layer_pairs", "load", "open_cache", "run", "status"]
