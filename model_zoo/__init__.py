"""model_zoo: torch modules (quantizers, tokenizers, priors, discriminators, perceptual nets), the
registry of named presets, sampling, the zoo package format and ``from_pretrained``. Single-device code: DeepSpeed,
activation checkpointing and compile are applied from outside (pretrain)."""

from .registry import create_model, list_models, model_entry, register_model  # noqa: F401

# Importing the model files registers their presets.
from . import (discriminators, mqvae, stackformer, t2i_prior, text_encoders, vim, vit_vqgan,  # noqa: E402,F401
               vqgan)
from .zoo import from_pretrained  # noqa: E402,F401
