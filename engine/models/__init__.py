"""Model definitions: one generic decoder plus the architecture registry."""
from engine.models.decoder import CausalLM
from engine.models.registry import (
    ArchitectureSpec,
    get_architecture,
    get_model_class,
    register_architecture,
    supported_architectures,
)

__all__ = [
    "ArchitectureSpec",
    "CausalLM",
    "get_architecture",
    "get_model_class",
    "register_architecture",
    "supported_architectures",
]
