"""dpdist: distributed differentially private training of Transformer language models."""
from .model.config import ModelConfig
from .model.gpt import build_model

__all__ = ["ModelConfig", "build_model"]
