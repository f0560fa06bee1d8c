"""Models. They never import parallel/ or attention/: attention is an injected op."""

from meshweave.models.attention_api import AttentionMeta, AttentionOp, local_attention
from meshweave.models.flops import flops_per_token, parameter_count
from meshweave.models.llama import ModelConfig, Transformer

__all__ = ["AttentionMeta", "AttentionOp", "ModelConfig", "Transformer", "flops_per_token", "local_attention", "parameter_count"]
