"""Fingerprints of an extractor: everything that decides its features, as one digest."""

from __future__ import annotations

import hashlib

import torch


def _tensor_bytes(t):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def weights_digest(net):
    """Hash of the extractor itself: class, structure (``repr``), every parameter and buffer,
    tensors held as plain attributes, and the names of forward hooks."""
    h = hashlib.blake2b(digest_size=20)
    for part in (type(net).__module__, type(net).__qualname__, repr(net)):
        h.update(part.encode())
        h.update(b"\0")
    for name, t in (*net.named_parameters(), *net.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    for prefix, m in net.named_modules():
        # hooks, and tensors held as plain attributes, change forward too
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for hook in hooks.values():
                h.update(f"{prefix}:hook:{getattr(hook, '__qualname__', repr(hook))}".encode())
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor):
                h.update(f"{prefix}.{name}:{value.dtype}:{tuple(value.shape)}".encode())
                h.update(_tensor_bytes(value))
    return h.hexdigest()
