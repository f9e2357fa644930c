"""SpectralKD pipeline: extract a teacher once into a Zarr cache, distill many students, analyze on Dask."""

from .config import ConfigError, PipelineConfig, load_config
from .errors import PipelineError

__all__ = ["ConfigError", "PipelineConfig", "PipelineError", "load_config"]
__version__ = "0.1.0"
