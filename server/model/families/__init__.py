"""MoE model families: config parsing, checkpoint names and router rules per architecture."""
from .base import MoEFamily
from .registry import UnsupportedArchitectureError, get_family, register_family, supported_architectures

# Built-in families register themselves on import.
from . import qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3  # noqa: E402,F401

__all__ = ["MoEFamily", "UnsupportedArchitectureError", "get_family", "register_family", "supported_architectures"]
