"""Integrations with other libraries: diffusers (`SSDDVAE`), Ray Data (`ray.tokenize`), latent statistics.

Importing this package imports none of them; `ssdd_runtime.integrations.SSDDVAE` imports diffusers on first access
(ImportError with the install hint when it is missing)."""


def __getattr__(name: str):
    if name == "SSDDVAE":
        from ssdd_runtime.integrations.diffusers import SSDDVAE

        return SSDDVAE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
