"""The model core: config, checkpoint reading by block range, our Llama block, the client head."""

from swarm.model.block import KVCache, Segment, Span, load_span
from swarm.model.config import ModelConfig
from swarm.model.head import Head, load_head
from swarm.model.weights import DEFAULT_MODEL, Checkpoint, ModelFingerprint, open_checkpoint, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "Checkpoint",
    "Head",
    "KVCache",
    "ModelConfig",
    "ModelFingerprint",
    "Segment",
    "Span",
    "load_head",
    "load_span",
    "open_checkpoint",
    "resolve_model",
]
