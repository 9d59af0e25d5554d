"""The frozen copy a fit works on, kept for the next fit of the same, unchanged extractor.

A fit never runs the user's module: it works on a private copy (:func:`~._torch.frozen_copy`:
eval mode, gradients off), whose digest keys the feature cache. Copying and hashing the
extractor again for each fit of a search costs more than the search's solves (a
ResNet-50-sized model: about 60 ms to copy and 140 ms to hash, for each of 151 fits; a small
MLP's copy is a tenth of its fit), so with the CPU as device, the copy one fit made, and the
digests computed from it (with the feature cache on), are kept for the next fit of the same
module object in the same thread. They are reused only while the module still equals the copy:

* the same walk of the module (:func:`~._fingerprint.walk`: the classes' code, attributes,
  hooks, torch's global state, and which tensors sit where), and the same walk of the copy
  (a copy whose forward changed its own attributes is not reused);
* bitwise the same contents of every parameter, buffer and tensor attribute, compared with the
  copy's at every fit. Version counters are not trusted: a write through ``.data`` or a numpy
  view moves none.

Not kept: a module whose walk keys some attribute by its type only (an object of the user's
own class, whose state the walk cannot see: a kept copy would keep its old state for whole
fits, where the cache's digest misses only cached rows) or cannot walk at all, both
remembered so that later fits do not walk it for nothing; and a named layer's model (the
layer's input is read through a hook registered on the copy during each forward, which
estimators sharing the copy in several threads would see).

The copy is then shared by the estimators fitted from it; nothing of skl_transfer writes to
it, and ``extractor_`` gives a user a copy of their own (:meth:`~._base.BaseAdapter.extractor_`).
"""

from __future__ import annotations

import os
import threading
import weakref

import torch

from . import _fingerprint
from ._layers import LayerInput
from ._torch import frozen_copy

MAX_THREADS = 4  # copies kept per module: one per thread (threaded searches), the latest ones
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # user's module -> {thread: Frozen}
_SHARED: weakref.WeakSet = weakref.WeakSet()  # every copy ever kept (estimators may share it)
_UNKEPT: weakref.WeakSet = weakref.WeakSet()  # modules found not to be keepable: no walks for them
_LOCK = threading.Lock()


def _reset_after_fork():
    global _LOCK
    _LOCK = threading.Lock()  # a fork while another thread held it leaves it held in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class Frozen:
    """A frozen copy ``net`` of a user's module, the wrappers made of it and their digests."""

    def __init__(self, net, stamp=None, own_stamp=None):
        self.net = net
        self._stamp, self._own_stamp = stamp, own_stamp  # walks of the module and of the copy, when kept
        self._layers = {}  # layer name -> LayerInput(net, name), the same wrapper each fit
        self._digests = {}  # id(wrapper or net) -> Digest

    def layer(self, name):
        """``LayerInput(net, name)``: the same object at each fit of a kept copy."""
        wrapper = self._layers.get(name)
        if wrapper is None:
            wrapper = LayerInput(self.net, name)
            if self._stamp is not None:
                self._layers[name] = wrapper
        return wrapper

    def digest(self, net):
        """The digest computed for ``net`` (the copy or a wrapper of it) by an earlier fit, or None."""
        return self._digests.get(id(net))

    def remember(self, net, digest):
        if self._stamp is not None and digest is not None:
            self._digests[id(net)] = digest

    def matches(self, module):
        """Whether ``module`` still equals the copy: both walks as when the copy was kept (the
        module's and the copy's own), and the module's tensors bitwise the copy's."""
        try:
            w = _fingerprint.walk(module)
            return w.hexdigest() == self._stamp and _stamp_if_equal(w, self.net) == self._own_stamp
        except _fingerprint.Unkeyable:
            return False


def _stamp_if_equal(w, net):
    """The walk stamp of the copy ``net`` when the tensors of ``w`` (its module's walk) are
    bitwise its own, on the same devices, else None. Raises :class:`~._fingerprint.Unkeyable`."""
    own = _fingerprint.walk(net)
    if len(own.tensors) != len(w.tensors):
        return None
    pairs = zip(w.tensors, own.tensors, strict=True)
    same = all(a.device == b.device and _fingerprint.same_bits(a, b) for a, b in pairs)
    return own.hexdigest() if same else None


def frozen(module, device, keep):
    """A :class:`Frozen` copy of ``module`` on ``device`` for a fit.

    With ``keep`` (no named layer), a copy on the CPU
    is kept for the next fit of ``module`` in this thread, and that fit gets it back when
    ``module`` still equals it (:meth:`Frozen.matches`); otherwise a new copy is made.
    """
    device = torch.device(device)
    if not keep or device.type != "cpu":
        return Frozen(frozen_copy(module, device))
    thread = threading.get_ident()
    with _LOCK:  # (torch's own named_modules needs hashable modules too)
        if module in _UNKEPT:
            return Frozen(frozen_copy(module, device))
        kept = _MEMO.get(module, {}).get(thread)
    if kept is not None and kept.matches(module):
        return kept
    net = frozen_copy(module, device)
    try:
        w = _fingerprint.walk(module)
        if w.loose:  # state the walk cannot see: not kept, now or at later fits
            raise _fingerprint.Unkeyable("module", "an attribute keyed by its type only")
        own_stamp = _stamp_if_equal(w, net)
    except _fingerprint.Unkeyable:
        with _LOCK:
            _UNKEPT.add(module)
        return Frozen(net)
    if own_stamp is None:
        return Frozen(net)  # a copy unlike its module (a custom __deepcopy__): not kept
    made = Frozen(net, w.hexdigest(), own_stamp)
    with _LOCK:
        _SHARED.add(net)
        per_thread = _MEMO.setdefault(module, {})
        per_thread.pop(thread, None)
        per_thread[thread] = made
        while len(per_thread) > MAX_THREADS:
            per_thread.pop(next(iter(per_thread)))
    return made


def is_shared(net):
    """Whether ``net`` is a copy that was kept, which several estimators may hold."""
    return net is not None and net in _SHARED


def forget():
    """Drop every kept copy (:func:`~skl_transfer.clear_cache`); estimators keep theirs."""
    with _LOCK:
        _MEMO.clear()
        _UNKEPT.clear()
