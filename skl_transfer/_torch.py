"""The torch/numpy boundary: the one place where tensors and numpy arrays meet.

Device resolution, the private frozen copy of an extractor, its dtype and device, batched
inference of rows of X (a private copy of each batch, never the user's array), checks of
what the extractor returns, forward-mode products, and every conversion between tensors and
numpy arrays (:func:`to_numpy`, :func:`to_float64`, :func:`host_bits`, :func:`from_host_bits`,
:func:`as_device_arrays`). A leaf: it imports nothing from the package.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import torch


def is_tensor(x):
    return isinstance(x, torch.Tensor)


def to_numpy(x):
    """A CPU numpy view or copy of ``x`` if it is a tensor; ``x`` unchanged otherwise."""
    if is_tensor(x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # no numpy equivalent; float32 holds it exactly
            x = x.float()
        return x.numpy()
    return x


def resolve_device(device):
    """``"auto"`` -> cuda when available else cpu; anything else must name a usable device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:0'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} asks for CUDA but torch.cuda.is_available() is False; "
            "use device='auto' or device='cpu'."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} asks for MPS, which is not available; use device='cpu'.")
    if dev.type == "meta":
        raise ValueError(
            f"device={device!r} holds no data (meta tensors have shapes only), so no features can be "
            "computed there; use device='auto', 'cpu' or 'cuda'."
        )
    if dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as err:
            cause = (str(err).strip().splitlines() or [""])[0][:200]
            raise ValueError(
                f"device={device!r} cannot hold tensors in this torch ({type(err).__name__}: {cause}); "
                "use device='auto', 'cpu' or 'cuda', or install the torch backend for that device."
            ) from err
    return dev


def frozen_copy(module, device):
    """A private copy of ``module`` on ``device``, in eval mode, with gradients off.

    The user's module is only read (deep-copied): its weights, training flag, device,
    dtype and requires_grad flags stay as they were.
    """
    try:
        net = copy.deepcopy(module)
    except Exception as err:
        raise ValueError(
            f"Could not copy the extractor {type(module).__name__} ({err}); the estimator works on "
            "a private copy so as never to modify yours. Make the module deep-copyable (for "
            "weight norm, use torch.nn.utils.parametrizations.weight_norm)."
        ) from err
    with warnings.catch_warnings():  # Module.to reads .grad of a copied TorchScript module's non-leaf weights
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        net.to(device)
    net.eval()
    for p in net.parameters():  # (a TorchScript module refuses requires_grad_ on itself)
        if p.is_leaf:  # (a deep-copied TorchScript module's may not be: run under inference_mode anyway)
            p.requires_grad_(False)
    return net


def floating_dtype(module):
    """The dtype of the module's first floating-point parameter or buffer, or None."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def module_device(module):
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def input_batch(X, sl, device, dtype):
    """A private copy of rows ``sl`` of X as a tensor on ``device``.

    Floating inputs are cast to the extractor's dtype; the copy guarantees that an
    in-place first layer can never write into the user's array.
    """
    copied = not is_tensor(X)  # numpy rows are copied here; a tensor's are copied by .to
    xb = torch.from_numpy(np.array(X[sl], copy=True, order="C")) if copied else X[sl].detach()
    if dtype is not None and xb.is_floating_point():
        return xb.to(device=device, dtype=dtype, copy=not copied)
    return xb.to(device=device, copy=not copied)


def forward(net, xb):
    """One forward pass of the frozen copy; errors name the batch and keep the cause."""
    try:
        out = net(xb)
    except Exception as err:
        if not xb.is_floating_point() and floating_dtype(net) is not None:
            fix = (
                f"X has dtype {xb.dtype}, passed to the extractor unchanged (integers stay integers, "
                "for extractors that take indices such as an nn.Embedding), while the extractor "
                f"computes in {floating_dtype(net)}: convert X, e.g. X.astype(np.float32) (scaled "
                "as the network expects, e.g. / 255 for 8-bit images)."
            )
        else:
            fix = "Pass X of shape (n_samples, *input_shape) with the input shape the extractor expects."
        raise ValueError(
            f"The extractor {type(net).__name__} failed on a batch of shape "
            f"{tuple(xb.shape)} (dtype {xb.dtype}): {err}. {fix}"
        ) from err
    return check_output(out, xb.shape[0])


def check_output(out, n):
    """The extractor's output for a batch of ``n`` samples: one real tensor, batch first."""
    if not is_tensor(out):
        raise TypeError(
            f"The extractor must return a tensor of features, got {type(out).__name__}; "
            "wrap it so that forward returns a single tensor."
        )
    if out.is_complex():
        raise ValueError(
            f"The extractor returned complex features (dtype {out.dtype}); the update is real. "
            "Return real features from the extractor, e.g. torch.view_as_real(z).flatten(1) "
            "(real and imaginary parts as features) or z.abs()."
        )
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(
            f"The extractor returned shape {tuple(out.shape)} for a batch of "
            f"{n} samples; its output must keep the batch dimension first."
        )
    return out


def check_finite(Z):
    """Z, or a ValueError when it holds NaN or infinite values. A NaN or an infinity makes the
    sum non-finite, so the elementwise test (20 times slower) runs only then, and when finite
    values are so large that their sum overflows."""
    if not Z.is_floating_point() and not Z.is_complex():
        return Z
    if not bool(torch.isfinite(Z.sum())) and not bool(torch.isfinite(Z).all()):
        raise ValueError(
            "The extractor produced NaN or infinite features; check its weights and "
            "the scale and dtype of X (float16 overflows above 65504)."
        )
    return Z


def forward_rows(net, X, rows, device, dtype):
    """Finite-checked features of the rows of X at ``rows`` (a slice or indices)."""
    return check_finite(forward(net, input_batch(X, rows, device, dtype)))


def as_device_arrays(device, *arrays, dtype=torch.float64):
    """Numpy arrays (or tensors) as tensors of ``dtype`` on ``device`` (no copy when they
    already are)."""
    return [torch.as_tensor(a, dtype=dtype, device=device) for a in arrays]


def raw_rows(X, rows, device):
    """A private copy of the rows of X as a tensor on ``device``, in X's own dtype."""
    if is_tensor(X):
        return X[rows].detach().to(device=device, copy=True)
    return torch.from_numpy(np.array(X[rows], copy=True, order="C")).to(device)


_JVP_IMPORTED = False


def jvp(net, x, v):
    """``torch.func.jvp(net, (x,), (v,))``.

    torch's first jvp imports its forward-mode decompositions through the deprecated
    ``torch.jit.script`` (torch 2.13), a warning about torch's internals that the user can do
    nothing about: it is silenced on that first call only.
    """
    global _JVP_IMPORTED
    if _JVP_IMPORTED:
        return torch.func.jvp(net, (x,), (v,))
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        out = torch.func.jvp(net, (x,), (v,))
    _JVP_IMPORTED = True
    return out


def to_float64(x):
    """A tensor (any device, any floating dtype) or array as a float64 numpy array."""
    if is_tensor(x):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def from_numpy(a):
    """A CPU tensor sharing the memory of numpy array ``a`` (of a copy when ``a`` has a negative
    stride, which torch does not take: a reversed column, a flipped channel)."""
    if a.ndim and min(a.strides) < 0:
        a = a.copy()
    return torch.from_numpy(a)


def host_bits(t):
    """A CPU numpy array with the same bits as tensor ``t`` (bfloat16, which numpy lacks, as
    int16 bits); numpy arrays are returned as they are."""
    if not is_tensor(t):
        return np.asarray(t)
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_host_bits(a, dtype_name):
    """The inverse of :func:`host_bits`: a CPU tensor of ``dtype_name`` ("bfloat16" for int16
    bits) sharing ``a``'s memory."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def numpy_dtype(dtype_name):
    """The numpy dtype that :func:`host_bits` gives for tensors of torch dtype ``dtype_name``."""
    if dtype_name == "bfloat16":
        return np.dtype(np.int16)
    return torch.empty(0, dtype=getattr(torch, dtype_name)).numpy().dtype
