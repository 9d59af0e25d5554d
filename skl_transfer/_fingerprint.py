"""Fingerprints of an extractor: everything that decides its features, as one digest.

The digest (:func:`fingerprint`) covers the computation that runs, not only the weights:

* every module of the tree: its class (module and qualified name) and, for the classes of its
  MRO that come from no installed package, the code of their methods (bytecode, constants,
  names, defaults, closures, recursively through nested code) and the functions, classes and
  plain values that code loads as globals (``helpers.f`` through a module global too),
  recursively; code of installed packages (torch, numpy, torchvision, ...) and of the standard
  library is keyed by the package's version and Python's;
* its parameters, buffers and tensors held anywhere in its attributes (bitwise, with their
  strides, the class of a tensor subclass and Python attributes set on a tensor), its plain
  attributes (numbers, strings, bytes, None, tuples, lists, dicts and sets of those, numpy
  arrays, dataclasses, enums, functions); an attribute of another kind is keyed by its type
  only (its state is not seen);
* every forward and forward-pre hook of every module, and torch's global module hooks: their
  code and their state (closure cells, defaults, ``functools.partial`` arguments, a bound
  method's object, a callable object's attributes), of the value kinds above only;
* torch's global state that changes numerics: default dtype, autocast, matmul precision, TF32
  flags, active torch function and dispatch modes.

What cannot be keyed raises :class:`Unkeyable`; the caller then does not cache that extractor.

The digest is a :class:`Digest`, a ``str`` that remembers the identity, version counter and
a few sampled elements of every tensor it covered and a hash of everything else
(:meth:`Digest.matches`): whether a module still matches its digest is checked without
hashing its weights again. A digest unpickled from elsewhere is a plain ``str``, never trusted.
"""

from __future__ import annotations

import dataclasses
import dis
import enum
import functools
import hashlib
import importlib.metadata
import os
import site
import sys
import sysconfig
import threading
import types
import warnings
import weakref

import numpy as np
import torch

from ._torch import host_bits


class CacheKeyWarning(UserWarning):
    """The feature cache was not used for an extractor.

    The extractor cannot be keyed, or it is not deterministic. The estimator then computes
    every feature afresh and its results are those of ``cache=False``; the message says why
    and how to get caching back. One warning per process and kind of cause.

    See Also
    --------
    clear_cache : Forget the cache's rows, choices and determinism verdicts.
    CacheDirectoryError : The errors of a cache directory.

    Notes
    -----
    **Keys.** A feature row is stored under the extractor's *digest*, the device, the input
    dtype and per-sample shape, and a 128-bit hash of the input row's bytes (SHA-256 in a
    cache directory); the moments of a whole fit are keyed further by every other input of
    the solve: the targets, weights, prior head, the head's geometry (a conv head's kernel,
    stride, padding and dilation), the feature shape and the batch size. The digest covers
    the computation, not only the weights:

    - every module of the tree: its class (module and qualified name), and for classes that
      come from no installed package (your own, a notebook's, an editable install's) the code
      of every method of their MRO (bytecode, constants, names, defaults, closures, nested
      functions) and what that code loads as globals (helper functions, classes, constants,
      ``helpers.f`` through a module), recursively. Code of installed packages (torch, numpy,
      torchvision, ...) and of the standard library is keyed by the package's version and
      Python's. Redefining a class with another
      ``forward`` under the same name is therefore a miss;
    - every parameter and buffer (bitwise, with its strides: a memory format such as
      ``channels_last`` runs other kernels; and Python attributes set on a tensor), tensors
      and numpy arrays held in attributes, and
      the module's plain attributes (numbers, strings, bytes, None, tuples, lists, dicts and
      sets of those, dataclasses, enums, functions, ``functools.partial`` objects, classes),
      and its ``repr``;
    - every forward and forward-pre hook of every module, with or without kwargs, and torch's
      global module hooks: their code and their state (closure variables, defaults,
      ``partial`` arguments, the object of a bound method, a callable object's attributes);
    - torch's global state that changes numerics: default dtype, autocast, float32 matmul
      precision, TF32 flags, active torch function/dispatch modes.

    **Not seen.** The state of an attribute of any other kind (an instance of your own class,
    a logger, ...) is keyed by its *type only*, so that such objects do not make every fit a
    miss: if ``forward`` reads a value from one, changing that value is not seen (use
    ``cache=False``, or hold the value as a plain attribute). Code of installed packages is
    keyed by version, not by its bytes (an edited site-packages file is not seen); code
    reached other than through the module's class, its globals and its attributes (e.g.
    ``getattr(module, name)`` with a computed name, ``eval``) is not seen; randomness or state
    outside torch (numpy's or Python's random generators, files read by ``forward``) is not
    seen.

    **The fitted copy** ``extractor_`` is never trusted blindly: its digest is kept with the
    identity, version counter, storage pointer and 8 sampled elements of each of its tensors
    and a hash of its code, attributes and hooks, and ``predict`` hashes the weights again
    when any of these changed (in-place edits, ``load_state_dict``, a new parameter or
    submodule, a hook, an attribute). Not seen without a rehash: an in-place write through
    ``.data`` or a numpy view (no version counter moves) that leaves all 8 sampled elements of
    every tensor unchanged. A digest is never read from a pickle: an unpickled estimator
    recomputes it on its first ``predict``.

    **This warning** is raised, and the extractor not cached, for:

    - a hook (or active torch mode) whose state holds an object of no kind above (its state
      cannot be read), a TorchScript module or object attribute (their attributes live in
      C++, where they cannot be listed), or a tensor whose bytes cannot be read;
    - a non-deterministic extractor. The first time a model is seen in a process, its first
      sample, if no cache holds it, runs twice (random state restored in between, so a fit
      equals ``cache=False`` with the same seed) and must give the same bits and leave its
      parameters, buffers and attributes as they were (a first-call lazy initialisation is
      allowed), before the row is stored. A functional dropout that ignores ``eval()`` or a
      ``forward`` that updates its own weights is detected there (the warning says that
      ``predict``, ``to_module()`` and refits will not agree run to run). This costs one
      extra row per model and process (``clear_cache()`` forgets the verdicts too); a first
      row found in a cache directory is trusted (the process that stored it ran the check).
      It is a check on one sample, not a proof (a module random on rare inputs only is not
      detected).

    Examples
    --------
    >>> import warnings
    >>> from skl_transfer import CacheKeyWarning
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", CacheKeyWarning)  # fits below raise instead
    ...     pass
    """


class Unkeyable(Exception):
    """Part of the extractor cannot be keyed; ``kind`` names the kind of cause."""

    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class NotDeterministic(Exception):
    """Raised by the probe of :func:`verify` (inside the cache's compute, so nothing is stored)."""

    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _tensor_bytes(t):
    t = t.detach().resolve_conj().resolve_neg()  # the values, not a lazy conjugate or negation
    if t.is_quantized:
        q = [str(t.qscheme()), t.int_repr()]
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            q += [repr(t.q_scale()), repr(t.q_zero_point())]
        else:
            q += [t.q_per_channel_scales(), t.q_per_channel_zero_points(), str(t.q_per_channel_axis())]
        return b"\0".join(_tensor_bytes(x) if isinstance(x, torch.Tensor) else x.encode() for x in q)
    if t.layout != torch.strided:
        t = t.to_dense()
    return host_bits(t.contiguous()).tobytes()


def _version(t):
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it keeps no version counter
        return -1


_SAMPLE_INDEX: dict = {}  # number of elements -> the sampled positions
_NUMPY_DTYPES = {
    torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
}  # fmt: skip


def _sample(t):
    """A few elements of ``t`` (its bytes): sees a rewrite that bumps no version counter (through
    ``.data`` or a numpy view) when it changes one of them."""
    try:
        flat = t.detach().reshape(-1)
        n = flat.shape[0]
        if n == 0 or t.is_quantized or t.layout != torch.strided:
            return b""
        idx = _SAMPLE_INDEX.get(n)
        if idx is None:
            idx = _SAMPLE_INDEX[n] = torch.linspace(0, n - 1, min(n, 8), dtype=torch.float64).long()
        if flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES:  # numpy indexes faster
            return flat.numpy()[idx.numpy()].tobytes()
        return _tensor_bytes(flat[idx.to(flat.device)])
    except Exception:
        return b""


# -- which code is keyed by a version instead of its bytecode ----------------------------------

_SITE_DIRS = tuple(
    os.path.realpath(p)
    for p in {
        *getattr(site, "getsitepackages", list)(),
        getattr(site, "getusersitepackages", str)(),
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    }
    if p
)
_LIBRARIES: dict[str, str | None] = {}


def _library(modname):
    """``"name==version"`` when code of module ``modname`` is keyed by its package's version
    (the standard library, and packages installed under site-packages), else None (user code:
    its bytecode is hashed)."""
    top = (modname or "").partition(".")[0]
    lib = _LIBRARIES.get(top, False)
    if lib is not False:
        return lib
    if top in ("builtins", "torch"):
        lib = f"{top}=={torch.__version__ if top == 'torch' else sys.version}"
    elif top in sys.stdlib_module_names:
        lib = f"python=={sys.version}"
    else:
        lib = None
        module = sys.modules.get(top)
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(_SITE_DIRS):
            version = getattr(module, "__version__", None)
            if not isinstance(version, str):
                try:
                    version = importlib.metadata.version(top)
                except Exception:
                    version = None
            lib = f"{top}=={version}" if isinstance(version, str) else None
    _LIBRARIES[top] = lib
    return lib


# -- code objects ------------------------------------------------------------------------------

_CODE_MEMO: dict = {}  # code object -> (digest, global paths); code objects are immutable
_GLOBAL_OPS = {"LOAD_GLOBAL", "LOAD_NAME"}
_ATTR_OPS = {"LOAD_ATTR", "LOAD_METHOD"}


def _code(code):
    """(digest of a code object, the global names and dotted paths ``(name, attr, ...)`` that it
    and its nested code load)."""
    memo = _CODE_MEMO.get(code)
    if memo is not None:
        return memo
    h = hashlib.blake2b(digest_size=20)
    paths = []
    for part in (
        code.co_code,
        code.co_exceptiontable if hasattr(code, "co_exceptiontable") else b"",
        repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)),
        repr(code.co_names),
        repr(code.co_varnames),
        repr(code.co_freevars),
        repr(code.co_cellvars),
    ):
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            sub, sub_paths = _code(const)
            h.update(b"code:" + sub.encode())
            paths += sub_paths
        else:
            h.update(f"{type(const).__name__}:{const!r}".encode())
        h.update(b"\0")
    path = None
    for ins in dis.get_instructions(code):
        if ins.opname in _GLOBAL_OPS:
            if path:
                paths.append(tuple(path))
            path = [ins.argval]
        elif ins.opname in _ATTR_OPS and path:
            path.append(ins.argval)
        elif ins.opname not in ("PRECALL", "CACHE", "EXTENDED_ARG") and path:
            paths.append(tuple(path))
            path = None
    if path:
        paths.append(tuple(path))
    memo = (h.hexdigest(), tuple(dict.fromkeys(paths)))
    if len(_CODE_MEMO) > 100_000:
        _CODE_MEMO.clear()
    _CODE_MEMO[code] = memo
    return memo


# -- the walk over an extractor ----------------------------------------------------------------

_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_TENSOR_CLASSES = (torch.Tensor, torch.nn.Parameter)  # torch's own: other classes are keyed by their code
_TORCH_ATOMS = (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size)
_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)
_SCRIPT_OBJECT = getattr(torch, "ScriptObject", getattr(torch._C, "ScriptObject", ()))


class _Walk:
    """One traversal: a hash of everything but tensor contents, and the tensors met, in order."""

    def __init__(self):
        self._parts = []  # what is hashed, joined once by hexdigest()
        self.tensors = []
        self.loose = False  # whether some object was keyed by its type only (its state unseen)
        self.globals = None  # walk(): the hash of torch's global state alone (global_stamp())
        self._seen = {}
        self._alive = []  # keeps every object met alive during the walk: ids stay unique

    def put(self, *parts):
        self._parts.extend(parts)

    def hexdigest(self):
        # str() of a bytes part is its repr: still one string per distinct value
        data = "\0".join(map(str, self._parts)).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(data, digest_size=20).hexdigest()

    def _ref(self, obj):
        """True (and a back-reference hashed) when ``obj`` was met before."""
        key = id(obj)
        if key in self._seen:
            self.put("ref", self._seen[key])
            return True
        self._seen[key] = len(self._seen)
        self._alive.append(obj)
        return False

    # values ---------------------------------------------------------------------------

    def value(self, v, strict, where):
        """Key a value. ``strict``: a value of no kind above raises :class:`Unkeyable` (a
        hook's state); otherwise only its type is keyed (a module's attributes, globals)."""
        t = type(v)
        if t in _PLAIN:
            self.put(t.__name__, repr(v))
        elif isinstance(v, torch.Tensor):
            self.tensor(v, where)
        elif isinstance(v, _TORCH_ATOMS):
            self.put("torch", t.__name__, str(v))
        elif isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                if strict:
                    raise Unkeyable("hook", f"{where} holds a numpy object array")
                self.put("ndarray", "object", v.shape)
            else:
                self.put("ndarray", v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes())
        elif isinstance(v, np.generic):
            self.put("npscalar", v.dtype.str, v.tobytes() if not isinstance(v, np.object_) else t)
        elif isinstance(v, enum.Enum):
            self.put("enum", t.__module__, t.__qualname__, v.name)
        elif isinstance(v, _SCRIPT_OBJECT) if _SCRIPT_OBJECT else False:
            raise Unkeyable(
                "module", f"{where} is a TorchScript object ({t.__qualname__}), whose state cannot be read"
            )
        elif self._ref(v):
            return
        elif isinstance(v, (tuple, list)):
            self.put(t.__module__, t.__qualname__, len(v))
            for i, x in enumerate(v):
                self.value(x, strict, f"{where}[{i}]")
        elif isinstance(v, dict):
            self.put(t.__module__, t.__qualname__, len(v))
            for k, x in v.items():
                self.value(k, strict, where)
                self.value(x, strict, f"{where}[{k!r}]")
        elif isinstance(v, (set, frozenset)):
            subs = []
            for x in v:
                sub = _Walk()
                sub._seen, sub._alive = self._seen, self._alive
                sub.value(x, strict, where)
                self.tensors += sub.tensors
                self.loose |= sub.loose
                subs.append(sub.hexdigest())
            self.put(t.__qualname__, *sorted(subs))
        elif isinstance(v, torch.nn.Module):
            self.module(v, where)
        elif isinstance(v, types.FunctionType):
            self.function(v, strict, where)
        elif isinstance(v, types.MethodType):
            self.put("method")
            self.value(v.__func__, strict, where)
            self.bound(v.__self__, strict, f"{where}.__self__")
        elif isinstance(v, functools.partial):
            self.put("partial")
            self.value(v.func, strict, where)
            self.value(v.args, strict, f"{where} (partial args)")
            self.value(v.keywords, strict, f"{where} (partial keywords)")
        elif isinstance(v, type):
            self.cls(v)
        elif isinstance(v, types.ModuleType):
            self.put("module", v.__name__)
        elif isinstance(v, _BUILTIN_CALLABLES):
            self.put("builtin", getattr(v, "__module__", None), getattr(v, "__qualname__", repr(v)))
            owner = getattr(v, "__self__", None)
            if owner is not None and not isinstance(owner, (types.ModuleType, type)):
                self.bound(owner, strict, f"{where}.__self__")
        elif isinstance(v, (staticmethod, classmethod)):
            self.put(t.__name__)
            self.value(v.__func__, strict, where)
        elif isinstance(v, property):
            self.put("property")
            for f in (v.fget, v.fset, v.fdel):
                self.value(f, strict, where)
        elif isinstance(v, types.CodeType):
            self.put("code", _code(v)[0])
        elif dataclasses.is_dataclass(v) or isinstance(v, types.SimpleNamespace):
            self.cls(t)
            for k, x in sorted(vars(v).items()) if hasattr(v, "__dict__") else ():
                self.put(k)
                self.value(x, strict, f"{where}.{k}")
        elif strict:
            raise Unkeyable("hook", f"{where} holds a {t.__module__}.{t.__qualname__} object")
        else:  # an object of another kind: its type only (documented)
            self.put("object")
            self.cls(t)
            self.loose = True

    def bound(self, obj, strict, where):
        """The object a method or hook is bound to: a module, a value, or (strict) an object
        whose attributes are values."""
        if isinstance(obj, torch.nn.Module) or not strict or not hasattr(obj, "__dict__"):
            self.value(obj, strict, where)
            return
        if self._ref(obj):
            return
        t = type(obj)
        if isinstance(obj, (tuple, list, dict, set, frozenset, functools.partial, types.FunctionType)):
            self.value(obj, strict, where)
            return
        self.put("object")
        self.cls(t)
        for k, x in sorted(vars(obj).items()):
            self.put(k)
            self.value(x, strict, f"{where}.{k}")

    def tensor(self, t, where):
        if self._ref(t):
            return
        # strides too: a memory format (channels_last) changes which kernels run, and their rounding
        strides = t.stride() if t.layout == torch.strided else None
        self.put("tensor", t.dtype, tuple(t.shape), strides, t.layout, t.is_quantized)
        if type(t) not in _TENSOR_CLASSES:  # a subclass: its code
            self.cls(type(t))
        if t.__dict__:  # Python attributes set on the tensor (a forward may read them)
            self.put("tensor attributes")
            self.value(dict(t.__dict__), False, f"{where} (its attributes)")
        self.tensors.append(t)

    def function(self, f, strict, where):
        self.put("function", f.__module__, f.__qualname__)
        lib = _library(f.__module__)
        if lib is not None:
            self.put(lib)
            paths = ()
        else:
            digest, paths = _code(f.__code__)
            self.put(digest)
        self.value(f.__defaults__, strict, f"{where} (defaults)")
        self.value(f.__kwdefaults__, strict, f"{where} (keyword defaults)")
        for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=True):
            self.put("cell", name)
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                self.put("empty")
                continue
            self.value(content, strict, f"{where} (closure variable {name!r})")
        g = f.__globals__
        for path in paths:  # globals the code loads: not a hook's own state, keyed leniently
            if path[0] not in g:
                continue  # a builtin, or a name not defined yet
            obj = g[path[0]]
            for attr in path[1:]:
                if not isinstance(obj, types.ModuleType):
                    break
                obj = getattr(obj, attr, None)
            self.put("global", ".".join(path))
            self.value(obj, False, f"global {'.'.join(path)}")

    def cls(self, c):
        self.put("class", c.__module__, c.__qualname__)
        lib = _library(c.__module__)
        if lib is not None:
            self.put(lib)
            return
        if self._ref(c):
            return
        for base in c.__mro__:
            if base is object or _library(base.__module__) is not None:
                self.put("base", base.__module__, base.__qualname__)
                continue
            self.put("body", base.__module__, base.__qualname__)
            for name, v in sorted(vars(base).items()):
                dunder = name.startswith("__") and name.endswith("__")
                if dunder and not isinstance(v, (types.FunctionType, staticmethod, classmethod, property)):
                    continue  # __dict__, __weakref__, __doc__, __slotnames__ (set by copyreg), ...
                self.put(name)
                self.value(v, False, f"{c.__qualname__}.{name}")

    def hook(self, h, where):
        """A hook's code and state; state of no value kind raises :class:`Unkeyable`."""
        if isinstance(h, (types.FunctionType, types.MethodType, functools.partial, *_BUILTIN_CALLABLES)):
            self.value(h, True, where)
        else:  # a callable object: its class and its attributes
            self.bound(h, True, where)

    def module(self, m, where="the extractor"):
        if isinstance(m, torch.jit.ScriptModule):
            # its attributes (numbers, strings, lists) live in C++, where nothing lists them: a
            # change to one would not be seen
            raise Unkeyable(
                "module",
                f"{where} is a TorchScript module ({type(m).__qualname__}), whose attributes cannot be read",
            )
        self.cls(type(m))
        for name, v in vars(m).items():
            if name in _MODULE_INTERNALS:
                continue
            self.put("attr", name)
            self.value(v, False, f"{where}.{name}")
        for kind in ("_parameters", "_buffers"):
            for name, t in m._parameters.items() if kind == "_parameters" else m._buffers.items():
                self.put(kind, name)
                if t is None:
                    self.put("None")
                else:
                    self.tensor(t, f"{where}.{name}")
        for flags in _HOOK_FLAGS:
            self.put(flags, *sorted(getattr(m, flags, {})))
        for hooks in _HOOK_DICTS:
            for hook_id, h in getattr(m, hooks, {}).items():
                self.put(hooks, hook_id)
                label = getattr(h, "__qualname__", type(h).__qualname__)
                self.hook(h, f"a {hooks[1:-1].replace('_', ' ')} of {where} ({label})")
        for name, child in m._modules.items():
            self.put("child", name)
            if child is None:
                self.put("None")
            elif not self._ref(child):
                self.module(child, f"{where}.{name}" if where != "the extractor" else name)


def _global_state(w):
    """Torch's process-wide state that changes what a forward computes."""
    w.put("python", sys.version, "torch", torch.__version__, "numpy", np.__version__)
    w.put("default dtype", torch.get_default_dtype(), "matmul", torch.get_float32_matmul_precision())
    w.put("tf32", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for device_type in ("cpu", "cuda"):
        try:
            w.put("autocast", device_type, torch.is_autocast_enabled(device_type))
            w.put(torch.get_autocast_dtype(device_type))
        except Exception:
            pass
    hooks = torch.nn.modules.module
    for name in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        for hook_id, h in getattr(hooks, name, {}).items():
            w.put(name, hook_id)
            w.hook(h, f"a global module hook ({getattr(h, '__qualname__', type(h).__qualname__)})")
    for name in ("_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called"):
        w.put(name, *sorted(getattr(hooks, name, {})))
    modes = []
    try:
        modes += torch.overrides._get_current_function_mode_stack()
    except Exception:
        pass
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        modes += _get_current_dispatch_mode_stack()
    except Exception:
        pass
    for mode in modes:
        w.put("mode")
        w.hook(mode, f"the active torch mode {type(mode).__qualname__}")


def global_stamp():
    """The hash of torch's global state that changes what a forward computes (default dtype,
    autocast, matmul precision, global module hooks, active modes), as :func:`walk` keys it."""
    w = _Walk()
    _global_state(w)
    return w.hexdigest()


def classes_stamp(classes):
    """The hash of the classes ``classes`` as :func:`walk` keys them (code of user classes,
    package and version of library ones). Raises :class:`Unkeyable`."""
    w = _Walk()
    for c in classes:
        w.cls(c)
    return w.hexdigest()


def walk(net):
    """The traversal of ``net``: ``hexdigest()`` keys everything but tensor contents, and
    ``tensors`` lists the tensors met, in order. Raises :class:`Unkeyable`."""
    w = _Walk()
    _global_state(w)
    w.globals = w.hexdigest()  # global_stamp(), from the same parts
    w.module(net)
    if w.loose:  # extra_repr may show what an object attribute (keyed by its type only) holds
        w.put("repr", repr(net))
    return w


class Digest(str):
    """The hex digest of an extractor (:func:`fingerprint`), which remembers what it covered.

    ``matches(net)`` says, without hashing the weights, whether ``net`` is still the module the
    digest was computed from: the same tensor objects with the same version counters, storage
    pointers and sampled elements, and the same hash of everything else (code, attributes,
    hooks, global state). Pickled, it is a plain ``str``, which is never trusted.
    """

    def __new__(cls, value, stamp, refs, globals_stamp=None):
        self = super().__new__(cls, value)
        self._stamp, self._refs, self._globals = stamp, refs, globals_stamp
        return self

    def __reduce__(self):
        return (str, (str(self),))

    def matches(self, net):
        try:
            w = walk(net)
        except Unkeyable:
            return False
        return w.hexdigest() == self._stamp and _same_refs(self._refs, _refs(w.tensors))

    def same_globals(self):
        """Whether torch's global state that changes numerics (:func:`global_stamp`) is as it was
        when the digest was computed: what a digest trusted without a walk must still check."""
        try:
            return self._globals is not None and global_stamp() == self._globals
        except Unkeyable:
            return False


def _refs(tensors):
    return [
        (weakref.ref(t), _version(t), t.data_ptr() if t.layout == torch.strided else 0, t.device, _sample(t))
        for t in tensors
    ]


def _same_refs(a, b):
    """Whether two ``_refs`` lists name the same tensors in the same state."""
    if len(a) != len(b):
        return False
    return all(
        ra() is not None and ra() is rb() and sa == sb for (ra, *sa), (rb, *sb) in zip(a, b, strict=True)
    )


def fingerprint(net):
    """The :class:`Digest` of an extractor; raises :class:`Unkeyable` when part of it cannot be keyed."""
    w = walk(net)
    stamp = w.hexdigest()
    h = hashlib.blake2b(stamp.encode(), digest_size=20)
    try:
        for t in w.tensors:
            h.update(_tensor_bytes(t))
            h.update(b"\0")
    except Exception as err:
        raise Unkeyable("module", f"a tensor of the extractor cannot be read as bytes ({err})") from err
    return Digest(h.hexdigest(), stamp, _refs(w.tensors), w.globals)


def fingerprint_state(net):
    """A :class:`Digest` of ``net`` without its value (tensor contents are not hashed), for
    :meth:`Digest.matches` only: whether ``net`` changes between two points."""
    w = walk(net)
    return Digest("", w.hexdigest(), _refs(w.tensors), w.globals)


def still_valid(digest, net):
    """Whether ``digest`` is a :class:`Digest` that ``net`` still matches."""
    return isinstance(digest, Digest) and digest.matches(net)


# -- the determinism probe -------------------------------------------------------------------------

_VERDICTS: dict = {}  # model key -> None (deterministic, or trusted from the cache) or the exception
_LOCKS: dict = {}
_GUARD = threading.Lock()
_WARNED: set = set()


def _reset_after_fork():
    global _GUARD
    _GUARD = threading.Lock()
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def forget():
    """Forget the determinism verdicts of this process (call with :func:`~skl_transfer.clear_cache`):
    the next fit of each model probes it again."""
    _VERDICTS.clear()


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a, b):
    """Whether tensors ``a`` and ``b`` hold the same bits (NaNs and signed zeros included),
    wherever they are: compared in place as integers, without a copy to the host."""
    if a.shape != b.shape or a.dtype != b.dtype or a.layout != b.layout:
        return False
    if "meta" in (a.device.type, b.device.type):  # no values to compare
        return a.device == b.device
    if a.layout != torch.strided or a.is_quantized:
        return _tensor_bytes(a) == _tensor_bytes(b)
    # (the values, not a lazy conjugate or negation, which view_as_real and view refuse)
    a = a.detach().resolve_conj().resolve_neg()
    b = b.detach().to(a.device).resolve_conj().resolve_neg()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        a, b = a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()])
    return torch.equal(a, b)


def verify(mkey, probe):
    """Run ``probe()`` the first time model key ``mkey`` is seen in this process (one thread at a
    time); returns None if the extractor may be cached, else the :class:`NotDeterministic` met."""
    verdict = _VERDICTS.get(mkey, False)
    if verdict is not False:
        return verdict
    with _GUARD:
        lock = _LOCKS.setdefault(mkey, threading.Lock())
    with lock:
        verdict = _VERDICTS.get(mkey, False)
        if verdict is False:
            try:
                probe()
                verdict = None
            except NotDeterministic as err:
                verdict = err
            if len(_VERDICTS) > 100_000:
                _VERDICTS.clear()
            _VERDICTS[mkey] = verdict
    with _GUARD:
        _LOCKS.pop(mkey, None)
    return verdict


_HOW = {
    "hook": "Give the hook only plain values, tensors, numpy arrays or modules as state (closure "
    "variables, functools.partial arguments, attributes of its object), or pass cache=False to "
    "silence this warning.",
    "module": "Replace that part by one whose state can be read (plain values, tensors, modules), "
    "or pass cache=False to silence this warning.",
    "random": "Make forward deterministic in eval mode (e.g. nn.Dropout instead of "
    "F.dropout(x, training=True)) to get caching back, or pass cache=False to silence this warning.",
    "state": "Make forward and its hooks leave their parameters, buffers, attributes and state as "
    "they are (keep counters in an object of your own class, which is keyed by its type only; a "
    "hook that records outputs would not run on cached rows) to get caching back, or pass "
    "cache=False to silence this warning.",
}


def warn_once(err):
    """One :class:`CacheKeyWarning` per process and kind of cause."""
    with _GUARD:
        if err.kind in _WARNED:
            return
        _WARNED.add(err.kind)
    what = "cannot be keyed" if isinstance(err, Unkeyable) else "is not deterministic"
    tail = (
        " Its features differ from run to run, so predict, to_module() and refits will not agree run to run."
        if isinstance(err, NotDeterministic)
        else ""
    )
    warnings.warn(
        f"The feature cache is not used for this extractor: it {what}: {err.reason}.{tail} "
        f"The estimator computes every feature afresh. {_HOW[err.kind]}",
        CacheKeyWarning,
        stacklevel=5,
    )
