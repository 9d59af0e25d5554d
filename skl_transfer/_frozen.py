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
  (a copy whose forward changed its own attributes is not reused); for a tree of plain
  attributes (numbers, strings, tuples of them, tensors) without forward hooks, which covers
  torch's layers, the shallow :class:`Quick` states of the module and of the copy instead,
  which imply the same walks;
* bitwise the same contents of every parameter, buffer and tensor attribute, compared with the
  copy's at every fit. Version counters are not trusted: a write through ``.data`` or a numpy
  view moves none.

With ``set_config(trust_version_counters=True)`` (:mod:`._config`), the bitwise comparison is
skipped for trees that :class:`Quick` checks: their tensors' version counters, identities and
storage are trusted instead (about 2 ms for a ResNet-50, against about 15 ms).

Not kept: a module whose walk keys some attribute by its type only (an object of the user's
own class, whose state the walk cannot see: a kept copy would keep its old state for whole
fits, where the cache's digest misses only cached rows), that cannot walk at all, whose
copy refers to it (:func:`_refers_to`: kept, the copy would keep the module alive), or whose
walk meets a tensor its copy shares (:func:`_shares_tensors`: a global, a class attribute, a
default or closure variable, a global module's weight; comparing the copy with the module
cannot see it change), all remembered so that later fits do not walk it for nothing; and a
named layer's model (the
layer's input is read through a hook registered on the copy during each forward, which
estimators sharing the copy in several threads would see).

The copy is then shared by the estimators fitted from it; nothing of skl_transfer writes to
it, and ``extractor_`` gives a user a copy of their own (:meth:`~._base.BaseAdapter.extractor_`).
"""

from __future__ import annotations

import gc
import os
import threading
import types
import weakref

import torch

from . import _config, _fingerprint
from ._layers import LayerInput
from ._torch import frozen_copy

MAX_THREADS = 4  # copies kept per module: one per thread (threaded searches), the latest ones
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # user's module -> {thread: Frozen}
# every copy ever kept (estimators may share it) -> a weak reference to its Frozen
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
        self._quick = None  # (Quick of the module, Quick of the copy), for trees it can check
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
        """Whether ``module`` still equals the copy.

        For trees that :class:`Quick` can check (plain attributes and tensors, no hooks): both
        Quick states as when the copy was kept, then the module's tensors bitwise the copy's
        (not with ``trust_version_counters``). Otherwise both walks as when the copy was kept
        (the module's and the copy's own), and the module's tensors bitwise the copy's."""
        if self._quick is not None:
            mine, its = self._quick
            if not (mine.same(module) and its.same(self.net)):
                return False
            if _config.get_config()["trust_version_counters"]:
                return True
            pairs = zip(mine.tensors(), its.tensors(), strict=True)
            return all(a.device == b.device and _fingerprint.same_bits(a, b) for a, b in pairs)
        try:
            w = _fingerprint.walk(module)
            return w.hexdigest() == self._stamp and _stamp_if_equal(w, self.net) == self._own_stamp
        except _fingerprint.Unkeyable:
            return False

    def take_quick(self, module):
        """Take the :class:`Quick` states of ``module`` and the copy, which :meth:`matches` then
        checks instead of walks (none when either tree has hooks or attributes other than plain
        values, tuples of them and tensors)."""
        pair = (Quick.of(module), Quick.of(self.net))
        self._quick = pair if None not in pair else None


class Quick:
    """What ``trust_version_counters`` compares instead of a walk and a bitwise comparison (and
    what the default compares instead of a walk, before the bitwise comparison): the module
    tree's objects by identity (submodules, attribute values, parameters, buffers), the
    attribute, parameter, buffer and child names, the tensors' version counters, storage
    pointers, shapes, strides, dtypes and devices, the classes' code and torch's global state.

    Only trees whose attributes are all plain values (or tuples of them) and tensors, with no
    forward hooks and no TorchScript, have one (:meth:`of` returns None otherwise): an object
    attribute can change inside without a new identity, and a hook's closure too. Modules and
    tensors are held by weak reference (a replaced weight is not kept alive, and nothing here
    keeps the user's module alive), plain values themselves (immutable, and their identity
    must stay unique).
    """

    __slots__ = ("_refs", "_key", "_tensors", "_tensor_keys", "_stamps")

    @classmethod
    def of(cls, net):
        if not _plain_tree(net):
            return None
        objs, key, classes = _shallow(net)
        try:
            stamps = (_fingerprint.classes_stamp(classes), _fingerprint.global_stamp())
        except _fingerprint.Unkeyable:
            return None
        self = cls()
        self._refs = [weakref.ref(o) if isinstance(o, _WEAK) else o for o in objs]
        self._key, self._stamps = key, stamps
        self._tensors = [
            o for o in self._refs if type(o) is weakref.ReferenceType and isinstance(o(), torch.Tensor)
        ]
        self._tensor_keys = [_tensor_key(t()) for t in self._tensors]
        return self

    def tensors(self):
        """The parameters, buffers and tensor attributes, in one order for a module and its copy
        (a tensor met twice, twice); valid after :meth:`same` returned True."""
        return [t() for t in self._tensors]

    def same(self, net):
        """Whether ``net`` is in the state this was taken in (as far as version counters tell)."""
        parts = _shallow(net)
        if parts is None:
            return False
        objs, key, classes = parts
        if key != self._key or len(objs) != len(self._refs):
            return False
        for ref, obj in zip(self._refs, objs, strict=True):
            if (ref() if type(ref) is weakref.ReferenceType else ref) is not obj:
                return False
        try:
            if [_tensor_key(t()) for t in self._tensors] != self._tensor_keys:
                return False
            return (_fingerprint.classes_stamp(classes), _fingerprint.global_stamp()) == self._stamps
        except (RuntimeError, _fingerprint.Unkeyable):  # a tensor turned sparse; unkeyable code
            return False


_WEAK = (torch.Tensor, torch.nn.Module)
_KEPT_INTERNALS = ("_parameters", "_buffers", "_modules")


def _shallow(net):
    """``(objects, key, classes)`` of the module tree ``net``: each module's attribute values
    (the walk's internals left out, as it leaves them), parameters, buffers and children; the
    attribute, parameter, buffer and child names; the classes. None when a module has forward
    hooks."""
    objs, key, classes = [], [], {}
    internals = _fingerprint._MODULE_INTERNALS
    for m in net.modules():
        d = m.__dict__
        # (the hooks' flag dicts are keyed by the ids of hooks in these two)
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks"):
            return None
        classes[type(m)] = None
        key.append(tuple(d))
        objs.extend(v for name, v in d.items() if name not in internals)
        for kind in _KEPT_INTERNALS:
            c = d[kind]
            key.append(tuple(c))
            objs.extend(c.values())
    return objs, key, list(classes)


_ATOMIC = _fingerprint._PLAIN + _fingerprint._TORCH_ATOMS  # immutable values, held as they are


def _plain_tree(net):
    """Whether every module of ``net`` holds only plain values, tuples of them and
    :func:`_plain_tensor` tensors as attributes, parameters and buffers, has no forward hooks
    and is no TorchScript module."""
    for m in net.modules():
        d = m.__dict__
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks") or isinstance(m, torch.jit.ScriptModule):
            return False
        for name, v in d.items():
            if name in _fingerprint._MODULE_INTERNALS:
                continue
            if isinstance(v, torch.Tensor):
                if not _plain_tensor(v):
                    return False
            elif type(v) not in _ATOMIC and not (type(v) is tuple and all(type(x) in _ATOMIC for x in v)):
                return False
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and not _plain_tensor(t):
                return False
    return True


_BUFFER_FLAGS = frozenset({"persistent", "_is_buffer"})  # what torch.nn.Buffer leaves on a buffer


def _plain_tensor(t):
    """A strided, unquantized tensor with a version counter (inference tensors keep none), of
    torch's own tensor classes and without Python attributes of its own (but for
    ``torch.nn.Buffer``'s flags), which :class:`Quick` does not compare."""
    return (
        type(t) in _fingerprint._TENSOR_CLASSES
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_inference()
        and t.__dict__.keys() <= _BUFFER_FLAGS
    )


def _tensor_key(t):
    """A tensor's version counter, storage pointer, shape, strides, dtype and device (a new
    storage, or a view of the old one set by ``p.data = ...``, moves one of them; the pointer
    includes the storage offset)."""
    if t is None:
        return None
    return (t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _stamp_if_equal(w, net, own=None):
    """The walk stamp of the copy ``net`` (``own``: its walk, when taken already) when the
    tensors of ``w`` (its module's walk) are bitwise its own, on the same devices, and none is
    the module's own tensor, else None. Raises :class:`~._fingerprint.Unkeyable`."""
    own = _fingerprint.walk(net) if own is None else own
    if len(own.tensors) != len(w.tensors) or _shares_tensors(w, own):
        return None
    pairs = zip(w.tensors, own.tensors, strict=True)
    same = all(a.device == b.device and _fingerprint.same_bits(a, b) for a, b in pairs)
    return own.hexdigest() if same else None


def _shares_tensors(w, own):
    """Whether the walks of a module (``w``) and of its copy (``own``) meet the same tensor
    object: one the copy does not own (a global, a class attribute, a function's default or
    closure, a global module's weight, a hook's state), which comparing the copy with its module
    cannot see change."""
    mine = {id(t) for t in w.tensors}  # (both walks keep what they met alive: ids are unique)
    return any(id(t) in mine for t in own.tensors)


_MAX_REFERENTS = 200_000  # objects searched from a copy; beyond, it is taken to refer to its module


def _refers_to(net, module):
    """Whether the copy ``net`` holds a reference to ``module`` or one of its submodules.

    ``deepcopy`` shares functions, so a hook (of any kind) or a function attribute whose
    closure, default or ``functools.partial`` argument holds the user's module is shared by
    the copy; kept in the memo keyed weakly by that module, the copy would then keep it alive
    for good. Everything the copy refers to is searched (``gc.get_referents``), but for
    functions' global namespaces, classes and Python modules, which are alive anyway.
    """
    targets = {id(m) for m in module.modules()}
    seen, stack = set(), [net]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if id(obj) in targets:
            return True
        if len(seen) > _MAX_REFERENTS:
            return True
        if isinstance(obj, (type, types.ModuleType)):
            continue
        refs = gc.get_referents(obj)
        if isinstance(obj, types.FunctionType):
            namespace = obj.__globals__
            refs = [r for r in refs if r is not namespace]
        stack.extend(refs)
    return False


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
        if _refers_to(net, module):  # kept, it would keep the module alive: not now, nor later
            raise _fingerprint.Unkeyable("module", "a function that holds the module itself")
        own = _fingerprint.walk(net)
        if _shares_tensors(w, own):  # an edit of such a tensor would not be seen: not kept
            raise _fingerprint.Unkeyable("module", "a tensor that its copy shares")
        own_stamp = _stamp_if_equal(w, net, own)
    except _fingerprint.Unkeyable:
        with _LOCK:
            _UNKEPT.add(module)
        return Frozen(net)
    if own_stamp is None:
        return Frozen(net)  # a copy unlike its module (a custom __deepcopy__): not kept
    made = Frozen(net, w.hexdigest(), own_stamp)
    made.take_quick(module)
    with _LOCK:
        _SHARED[net] = weakref.ref(made)
        per_thread = _MEMO.setdefault(module, {})
        per_thread.pop(thread, None)
        per_thread[thread] = made
        while len(per_thread) > MAX_THREADS:
            per_thread.pop(next(iter(per_thread)))
    return made


def is_shared(net):
    """Whether ``net`` is a copy that was kept, which several estimators may hold."""
    return net is not None and net in _SHARED


def copy_unchanged(net):
    """Whether the kept copy ``net`` is as it was kept, code and globals included, by the
    shallow check of :class:`Quick` (its classes' code and the globals it reads, torch's global
    state, its attributes and tensors): what lets ``predict`` reuse the copy's digest without a
    walk. False when that cannot be told so (not a kept copy, its :class:`Frozen` gone, a tree
    that :class:`Quick` does not check): the caller then walks it."""
    with _LOCK:
        ref = _SHARED.get(net) if net is not None else None
    made = ref() if ref is not None else None
    quick = None if made is None else made._quick
    return quick is not None and quick[1].same(net)


def forget():
    """Drop every kept copy (:func:`~skl_transfer.clear_cache`); estimators keep theirs."""
    with _LOCK:
        _MEMO.clear()
        _UNKEPT.clear()
