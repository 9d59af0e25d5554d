"""Process-wide settings of skl_transfer: :func:`set_config`, :func:`get_config`, :func:`config_context`."""

from __future__ import annotations

import contextlib
import threading

_DEFAULTS = {"trust_version_counters": False}
_CONFIG = dict(_DEFAULTS)
_LOCK = threading.Lock()


def get_config():
    """Return skl_transfer's current settings.

    The settings are process-wide: they hold in every thread of this process, and joblib's
    process workers (``n_jobs`` with the loky backend) start with the defaults.

    Returns
    -------
    config : dict
        A copy of the settings: ``{"trust_version_counters": bool}``.

    See Also
    --------
    set_config : Set the settings.
    config_context : Set them within a ``with`` block.

    Examples
    --------
    >>> import skl_transfer
    >>> skl_transfer.get_config()
    {'trust_version_counters': False}
    """
    return dict(_CONFIG)


def set_config(trust_version_counters=None):
    """Set skl_transfer's process-wide settings.

    The settings hold in every thread of this process; joblib's process workers (``n_jobs``
    with the loky backend) start with the defaults. None leaves a setting as it is.

    Parameters
    ----------
    trust_version_counters : bool, default=None
        How a fit tells that an extractor is unchanged since the previous fit, which then
        reuses that fit's frozen copy and digest instead of copying and hashing the extractor
        again (on the CPU). False (the default setting): every parameter, buffer and tensor
        attribute is compared bitwise with the kept copy, and the module tree is walked
        (code, attributes, hooks), so any change is seen, whatever made it; the comparison
        reads every weight (13 to 20 ms for 21 M parameters on two cores). True: torch's
        version counters, which every in-place torch operation on a tensor increments
        (``optimizer.step()``, ``load_state_dict``, ``nn.init``, ``p.add_(...)`` under
        ``torch.no_grad()``), are trusted instead, with the identity, storage and shape of
        every tensor and a shallow look at the module tree (attributes by identity, the
        classes' code, torch's global state); about 2 ms for a ResNet-50. A module with
        forward hooks or attributes other than plain values, tuples of them and tensors is
        still compared bitwise. Writes that no counter sees are then missed: through
        ``p.data`` (``p.data.mul_(2)``), a numpy view (``p.detach().numpy()[...] = ...``),
        DLPack or a C extension. Set it only when nothing writes the extractor's weights that
        way between fits (a search, a sparsity study).

    See Also
    --------
    get_config : The current settings.
    config_context : Set them within a ``with`` block.

    Examples
    --------
    >>> import skl_transfer
    >>> skl_transfer.set_config(trust_version_counters=True)
    >>> skl_transfer.get_config()["trust_version_counters"]
    True
    >>> skl_transfer.set_config(trust_version_counters=False)
    """
    with _LOCK:
        if trust_version_counters is not None:
            if not isinstance(trust_version_counters, bool):
                raise TypeError(
                    f"trust_version_counters must be True or False, got {trust_version_counters!r}."
                )
            _CONFIG["trust_version_counters"] = trust_version_counters


@contextlib.contextmanager
def config_context(**settings):
    """Set skl_transfer's settings within a ``with`` block.

    The previous settings are restored when the block ends, by an exception too.

    Parameters
    ----------
    **settings : dict
        The settings of :func:`set_config` (``trust_version_counters``).

    Yields
    ------
    None
        Nothing: the settings hold inside the block.

    See Also
    --------
    set_config : Set the settings for the rest of the process.
    get_config : The current settings.

    Examples
    --------
    >>> import skl_transfer
    >>> with skl_transfer.config_context(trust_version_counters=True):
    ...     skl_transfer.get_config()["trust_version_counters"]
    True
    """
    unknown = set(settings) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"Unknown setting(s) {sorted(unknown)}; the settings are {sorted(_DEFAULTS)}.")
    before = get_config()
    set_config(**settings)
    try:
        yield
    finally:
        set_config(**before)
