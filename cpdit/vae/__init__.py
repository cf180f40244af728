from cpdit.vae.config import VAE_PRESETS, VAEConfig
from cpdit.vae.model import CogVideoXVAE, DiagonalGaussian
from cpdit.vae.time import LocalTime

__all__ = ["VAE_PRESETS", "VAEConfig", "CogVideoXVAE", "DiagonalGaussian", "LocalTime"]
