"""SpectralKD pipeline: extract a teacher once into a Zarr cache, distill many students, analyze on Dask.

The package's names load on first use, so that ``pipeline.schema`` and ``pipeline.errors`` import
without the config (the loss registry builds on them, and the config on the registry).
"""

__version__ = "0.1.0"
__all__ = ["ConfigError", "PipelineConfig", "PipelineError", "load_config"]


def __getattr__(name: str):
    if name in ("PipelineConfig", "load_config"):
        from . import config

        return getattr(config, name)
    if name in ("ConfigError", "PipelineError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
