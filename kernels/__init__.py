from . import ops, reference
from . import cuda_ext
from .backend import BackendUnavailable, describe, get_backend, prime_attention, set_backend

# Try the optional extension now, not on the first op call: an import inside a torch.compile trace
# would be a graph break (fullgraph=True fails on it).
cuda_ext._load()

__all__ = ["ops", "reference", "set_backend", "get_backend", "describe", "prime_attention", "BackendUnavailable"]
