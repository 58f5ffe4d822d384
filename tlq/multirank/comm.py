"""Point-to-point transfers of tensors and small objects between pipeline stages.

A tensor travels as a fixed-size header (dtype, shape) and its bytes viewed as uint8, so any
dtype (bf16 included) and any shape cross gloo and NCCL alike, and the receiver needs no prior
knowledge of what comes. Sends are asynchronous (the 1F1B schedule needs that to be deadlock
free); `flush` waits for them. Objects (per-sample layer arguments, per-rank results) are
serialised with torch.save. Everything received lands on the CPU.
"""
from __future__ import annotations

import io

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 10
_HEADER = 2 + _MAX_DIMS


class Comm:
    """Transfers of one rank; `device` is where the backend wants buffers (cpu for gloo, cuda:i for nccl)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._pending: list[tuple] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        t = tensor.detach().contiguous()
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"cannot send a {t.dim()}-d tensor (at most {_MAX_DIMS} dims)")
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
        header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        self._isend(header, dst)
        if t.numel():
            self._isend(t.reshape(-1).view(torch.uint8), dst)

    def recv(self, src: int) -> torch.Tensor:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        header = header.cpu()
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        shape = [int(d) for d in header[2:2 + ndim]]
        numel = 1
        for d in shape:
            numel *= d
        buf = torch.empty(numel * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8, device=self.device)
        if numel:
            dist.recv(buf, src)
        return buf.cpu().view(dtype).reshape(shape)

    def send_list(self, tensors: list[torch.Tensor], dst: int) -> None:
        self.send(torch.tensor([len(tensors)], dtype=torch.int64), dst)
        for t in tensors:
            self.send(t, dst)

    def recv_list(self, src: int) -> list[torch.Tensor]:
        return [self.recv(src) for _ in range(int(self.recv(src)[0]))]

    def send_object(self, obj, dst: int) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.send(torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8), dst)

    def recv_object(self, src: int):
        return torch.load(io.BytesIO(self.recv(src).numpy().tobytes()), weights_only=False)

    def flush(self) -> None:
        """Wait until every send so far has been received."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _isend(self, t: torch.Tensor, dst: int) -> None:
        t = t.to(self.device)
        self._pending = [(w, x) for w, x in self._pending if not w.is_completed()]
        self._pending.append((dist.isend(t, dst), t))  # the buffer must live until the send completes
