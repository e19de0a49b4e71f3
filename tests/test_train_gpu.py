"""GPU checks of the trainers' host side (run by bench/gpu_suite.sh with the kernel GPU tests): a batch's copy to
the GPU is queued behind the work already there instead of waiting for it."""
import time

import pytest
import torch

from train.base import host_to_device

pytestmark = pytest.mark.gpu


def test_a_batch_copy_does_not_wait_for_the_queued_gpu_work():
    """The DiT trainer prefetches the next batch right after queuing a step's backward (~0.3 s of GPU work at
    XL/1): the copy of an XL/1 batch of latents (256 x 32 x 16 x 16 fp32, 8 MB, pageable as the loaders make it)
    must return to the host before that work is done, and arrive intact."""
    dev = torch.device("cuda")
    lat = torch.randn(256, 32, 16, 16)
    assert not lat.is_pinned()
    host_to_device(lat, dev)
    torch.cuda.synchronize()  # the first pinned block allocated (cudaHostAlloc) outside the timing
    torch.cuda._sleep(int(2e9))  # ~1 s of queued GPU work (clock cycles)
    t = time.perf_counter()
    out = host_to_device(lat, dev)
    host_s = time.perf_counter() - t
    busy = not torch.cuda.current_stream().query()  # the queued work is still running: the copy did not wait for it
    torch.cuda.synchronize()
    assert busy and host_s < 0.2, f"the copy held the host {host_s:.3f} s behind the queued GPU work"
    assert torch.equal(out.cpu(), lat)
