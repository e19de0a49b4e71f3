"""A CUDA out-of-memory error as torch 2.11 words it, for the tests of the commands' one-line OOM errors (the CPU
has no CUDA allocator to raise one)."""
import torch


def cuda_oom(allocate: str = "2.25 GiB", free: str = "1.06 GiB", gpu: int = 0) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {allocate}. GPU {gpu} has a total capacity of 79.19 GiB of which "
        f"{free} is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated "
        "memory 75.3 GiB is allocated by PyTorch, and 1.9 GiB is reserved by PyTorch but unallocated. If reserved "
        "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.")
