"""ssdd-runtime: fast, faithful inference for SSDD single-step diffusion decoder image tokenizers."""
from ssdd_runtime.api import SSDD
from ssdd_runtime.latents import check_latent_metadata, latent_metadata
from ssdd_runtime.model import DECODER_SIZES, DiagonalGaussian, SSDDModule, decoder_config, encoder_config
from ssdd_runtime.weights import DEFAULT_REPO, KNOWN_FILES

__version__ = "0.1.0"
__all__ = ["SSDD", "SSDDModule", "DiagonalGaussian", "DECODER_SIZES", "KNOWN_FILES", "DEFAULT_REPO",
           "decoder_config", "encoder_config", "latent_metadata", "check_latent_metadata", "evaluate", "__version__"]


def __getattr__(name: str):
    # evaluate: imported on first use, so `import ssdd_runtime` never loads its metric libraries' module graph
    if name == "evaluate":
        from ssdd_runtime.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'ssdd_runtime' has no attribute {name!r}")
