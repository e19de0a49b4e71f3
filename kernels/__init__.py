from . import ops, reference
from .backend import BackendUnavailable, describe, get_backend, set_backend

__all__ = ["ops", "reference", "set_backend", "get_backend", "describe", "BackendUnavailable"]
