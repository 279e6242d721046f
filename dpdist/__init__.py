"""dpdist: distributed differentially private training of Transformer language models."""
from .model import build_model
from .model.config import ModelConfig
from .model.hf import load_pretrained

__all__ = ["ModelConfig", "build_model", "load_pretrained"]
