"""ssdd-runtime: fast, faithful inference for SSDD single-step diffusion decoder image tokenizers."""
from ssdd_runtime.api import SSDD
from ssdd_runtime.latents import check_latent_metadata, latent_metadata
from ssdd_runtime.model import DECODER_SIZES, DiagonalGaussian, SSDDModule, decoder_config, encoder_config
from ssdd_runtime.weights import DEFAULT_REPO, KNOWN_FILES

__version__ = "0.1.0"
__all__ = ["SSDD", "SSDDModule", "DiagonalGaussian", "DECODER_SIZES", "KNOWN_FILES", "DEFAULT_REPO",
           "decoder_config", "encoder_config", "latent_metadata", "check_latent_metadata", "__version__"]
