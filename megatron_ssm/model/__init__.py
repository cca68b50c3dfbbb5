from .lm import MambaLM, LayerState

__all__ = ["MambaLM", "LayerState"]
