"""SpectralKD with a cached teacher, from Python: the cache in your own training loop.

::

    import spectralkd

    spectralkd.run("pipeline.yaml", "extract")          # the teacher, once
    cache = spectralkd.open_cache("pipeline.yaml")      # checked: fingerprint, digests, checksums
    ds = spectralkd.CacheDataset(cache, layers=[6, 7], widths=192)
    loss = spectralkd.loss("spectral", w_fft=0.2)      # any method of the registry (spectralkd.KINDS)

The command line (``spectralkd`` or ``python -m pipeline``) runs the same stages.
"""

from pipeline import __version__
from pipeline.config import ConfigError, PipelineConfig
from pipeline.errors import PipelineError

from losses import KINDS, LayerPair, StudentOutputs, TeacherTargets
from stages.trainer import Trainable

from .api import layer_pairs, load, open_cache, run, status
from .data import CacheDataset
from .losses import loss, student_loss

__all__ = ["KINDS", "CacheDataset", "ConfigError", "LayerPair", "PipelineConfig", "PipelineError", "StudentOutputs",
           "TeacherTargets", "Trainable", "__version__", "layer_pairs", "load", "loss", "open_cache", "run", "status",
           "student_loss"]
