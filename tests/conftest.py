"""Shared fixtures: seeding and tiny torch networks (all defined here, in one place)."""

import pytest
import torch
from torch import nn

from skl_transfer import _cache, clear_cache


@pytest.fixture(autouse=True)
def _seed_and_empty_cache(monkeypatch):
    """Each test starts with seeded torch and an empty in-memory feature cache.

    The default ``cache="auto"`` chooses by measured time whether a model is worth caching;
    the tiny networks here never are. So that tests which count the extractor's rows are
    deterministic, "auto" caches every model here (after measuring it, so its measuring path
    runs on every first fit); tests/test_cache_auto.py tests the real choice.
    """
    torch.manual_seed(0)
    clear_cache()
    monkeypatch.setattr(_cache, "_worth_caching", lambda cache_seconds, compute_seconds: True)


class RowCounter:
    """A counter shared by a module and all its deep copies (the estimators run a copy)."""

    def __init__(self):
        self.rows = 0

    def __deepcopy__(self, memo):
        return self


class CountingModule(nn.Module):
    """Wraps a module and counts the samples (rows) that it, or any deep copy of it, sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.counter = RowCounter()

    @property
    def rows_seen(self):
        return self.counter.rows

    def forward(self, x):
        self.counter.rows += x.shape[0]
        return self.inner(x)


def make_body(n_in=5, n_hidden=16, *, dtype=torch.float64, batchnorm=True, seed=0):
    """A small extractor with BatchNorm and Dropout, left in training mode like a user's model."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(n_in, n_hidden, dtype=dtype), nn.Tanh()]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_hidden, dtype=dtype))
    layers += [nn.Dropout(0.5), nn.Linear(n_hidden, n_hidden, dtype=dtype), nn.ReLU()]
    body = nn.Sequential(*layers)
    with torch.no_grad():
        for p in body.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)
        if batchnorm:
            body[2].running_mean.copy_(torch.randn(n_hidden, generator=g, dtype=dtype) * 0.1)
            body[2].running_var.copy_(torch.rand(n_hidden, generator=g, dtype=dtype) + 0.5)
    body.train()
    return body


def make_head(n_hidden=16, n_out=1, *, bias=True, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(n_hidden, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return head


def reference_features(body, X):
    """Independent oracle: the user's module, copied, in eval mode, one plain forward."""
    import copy

    net = copy.deepcopy(body).eval()
    with torch.no_grad():
        Z = net(torch.as_tensor(X, dtype=next(net.parameters()).dtype))
    return Z.reshape(Z.shape[0], -1).double().numpy()


def head_arrays(head):
    W0 = head.weight.detach().double().numpy()
    b0 = None if head.bias is None else head.bias.detach().double().numpy()
    return W0, b0


class FileCountingModule(nn.Module):
    """Counts rows across processes: every forward appends its batch size to a file."""

    def __init__(self, inner, path):
        super().__init__()
        self.inner = inner
        self.path = str(path)

    def forward(self, x):
        with open(self.path, "a") as f:
            f.write(f"{x.shape[0]}\n")
        return self.inner(x)

    def rows_seen(self):
        try:
            with open(self.path) as f:
                return sum(int(line) for line in f if line.strip())
        except FileNotFoundError:
            return 0
