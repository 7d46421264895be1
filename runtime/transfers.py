"""Host <-> device transfers of the scheduler's tick, so that it blocks on the device at most once.

    HostTransfers.to_device([3, 7])      # host ints -> [2] int64 on the device, pinned and non-blocking on a GPU
    HostTransfers.upload(host_tensor)    # a host tensor (a prompt's ids, positions) the same way
    HostTransfers.read(readout)          # the tick's one blocking read: the tensor's values

A pageable host-to-device copy (`torch.tensor(list, device="cuda")`) waits for the stream, and every `.tolist()`
of a device tensor is a blocking read; a tick that did several of each stalled the GPU's queue each time. Here
host ints are staged in a ring of persistent pinned buffers and copied without blocking, and everything the
host needs from a tick (the thinker's tokens, the talker's code 0: one tensor, runtime/decode_inputs.py
DecodeReadout) is copied into one pinned buffer, then read once after an event. On the CPU both are plain copies.
"""

from __future__ import annotations

import torch

STAGING_SLOTS, STAGING_WIDTH = 64, 64  # pinned staging buffers (reused in turn) and int64 values in each


class HostTransfers:
    def __init__(self, device: torch.device, on_gpu: bool, talker_stream=None):
        self.device, self.on_gpu, self.talker_stream = device, on_gpu, talker_stream
        self._staging, self._next = [], 0
        self._host = None  # the pinned read-back buffer, grown as needed
        if on_gpu:
            self._staging = [(torch.empty(STAGING_WIDTH, dtype=torch.long, pin_memory=True), torch.cuda.Event())
                             for _ in range(STAGING_SLOTS)]
            self._read_done = torch.cuda.Event()

    def to_device(self, values: list[int]) -> torch.Tensor:
        """Host ints -> [n] int64 on the device. On a GPU: written into the next pinned staging buffer (after the
        copy that last read it has finished, a ring's length ago), copied on the current stream without blocking."""
        if not self.on_gpu:
            return torch.tensor(values, dtype=torch.long, device=self.device)
        if len(values) > STAGING_WIDTH:  # larger than any tick's ids: a one-off pinned buffer
            return torch.tensor(values, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        buffer, copied = self._staging[self._next]
        self._next = (self._next + 1) % STAGING_SLOTS
        copied.synchronize()
        host = buffer[:len(values)]
        host.copy_(torch.as_tensor(values, dtype=torch.long))
        out = torch.empty(len(values), dtype=torch.long, device=self.device)
        out.copy_(host, non_blocking=True)
        copied.record()
        return out

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor -> the same on the device. On a GPU: staged in pinned memory (the caching host allocator
        keeps it until the copy has run) and copied on the current stream without blocking; a pageable copy would
        wait for everything queued on the stream first."""
        if tensor.device.type != "cpu" or not self.on_gpu:
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def read(self, tensor: torch.Tensor, wait_for_talker: bool = True) -> list:
        """A contiguous integer device tensor -> its values (`.tolist()`), through one blocking read: copied into
        pinned memory without blocking, then read after an event. The talker's stream is waited for first
        (wait_for_talker=False: the tensor is written on the main stream only)."""
        if self.talker_stream is not None and wait_for_talker:
            torch.cuda.current_stream(self.device).wait_stream(self.talker_stream)
        if not self.on_gpu:
            return tensor.tolist()
        if self._host is None or self._host.numel() < tensor.numel():
            self._host = torch.empty(max(tensor.numel(), 256), dtype=tensor.dtype, pin_memory=True)
        host = self._host[:tensor.numel()].view(tensor.shape)
        host.copy_(tensor, non_blocking=True)
        self._read_done.record()
        self._read_done.synchronize()
        return host.tolist()
