"""megatron-ssm: tensor-parallel inference for selective state-space language models."""

__version__ = "0.1.0"
