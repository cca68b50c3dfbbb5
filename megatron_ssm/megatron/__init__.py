"""megatron-core integration: our mixers as ModuleSpecs for MambaModel / HybridModel (specs.py), the
MambaLayer-contract adapter (mixer.py), a TE-free stack for both megatron-core versions (stack.py) and
loading our checkpoints into such a model (weights.py)."""
