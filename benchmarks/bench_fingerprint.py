"""What each fit of a search pays to copy and key an extractor, and what sklearn's clone pays.

A ResNet-50-shaped extractor (random weights, built here: a 7 x 7 stem and 16 bottleneck
blocks, 150 modules, 21 M parameters; ``--quick``: a 4-layer CNN) and, timed side by side in
one process (medians of --repeats runs):

* ``copy``: the private frozen copy a fit makes (``copy.deepcopy``, eval mode, no grad);
* ``hash``: the digest of that copy (every weight hashed), which keys the feature cache; the
  first fit of a module pays both (the copy only, with the cache off);
* ``next_fit``: what the next fit of the same unchanged module pays instead (on the CPU): a
  shallow check of the module and of the kept copy (``_frozen.Quick``: the attributes and
  tensors by identity, the classes' code, torch's global state) and a bitwise comparison of
  every tensor with the copy's, which finds a write that no version counter saw (``.data``,
  a numpy view); ``bitwise compare`` is that part;
* ``walks``: the walks of the module and of the copy (code, attributes, hooks), which replace
  the shallow check for a module with hooks or attributes other than plain values, tuples of
  them and tensors;
* ``read_weights``: one pass over the weights' bytes (``torch.sum`` of each tensor, 2 threads),
  the floor of any check that reads every weight;
* ``next fit, trust_version_counters=True``: the next fit's check with
  ``skl_transfer.config_context(trust_version_counters=True)``: torch's version counters,
  the tensors' identities and storage, the attributes by identity, the classes' code and
  torch's global state, in the module and the copy (no weight read: a write through ``.data``
  or a numpy view is then missed); an in-place write is checked to be seen;
* ``state``: the walk of the module tree without hashing the weights (what
  ``Digest.matches`` costs, the check that a fitted copy is unchanged at predict);
* ``sklearn_clone``: ``sklearn.base.clone`` of an estimator holding the extractor, which
  GridSearchCV calls once per candidate and fold (the modules are shared, not deep-copied),
  against ``deepcopy`` of the extractor (what it cost before).

    python benchmarks/bench_fingerprint.py
    python benchmarks/bench_fingerprint.py --quick
"""

import copy

import matplotlib

matplotlib.use("Agg")
import torch
from _common import barh_figure, median_time, parser, write_csv
from sklearn.base import clone
from torch import nn

from skl_transfer import LayerVariationalAdapter, _fingerprint, _frozen, config_context
from skl_transfer._torch import frozen_copy


def resnet50_like():
    """A 7 x 7 stem and ResNet-50's 3-4-6-3 bottlenecks (no skip connections: the cost of
    keying depends on modules and tensors, not on the graph)."""
    torch.manual_seed(0)
    layers, c = [nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU()], 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for _ in range(blocks):
            layers += [
                nn.Conv2d(c, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 4 * width, 1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            ]  # fmt: skip
            c = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--repeats", type=int, default=5)
    args = cli.parse_args(argv)
    net = small_cnn() if args.quick else resnet50_like()
    n_params = sum(p.numel() for p in net.parameters())
    n_modules = len(list(net.modules()))
    print(f"extractor: {n_params / 1e6:.1f} M parameters, {n_modules} modules; medians of {args.repeats}")
    first = frozen_copy(net, "cpu")
    t_copy, _ = median_time(lambda: frozen_copy(net, "cpu"), args.repeats)
    t_hash, _ = median_time(lambda: _fingerprint.fingerprint(first), args.repeats)
    t_state, _ = median_time(lambda: _fingerprint.fingerprint_state(first), args.repeats)
    kept = _frozen.frozen(net, "cpu", keep=True)
    t_next, again = median_time(lambda: _frozen.frozen(net, "cpu", keep=True), args.repeats)
    assert again is kept  # the next fit gets the kept copy back
    with config_context(trust_version_counters=True):
        trusting = _frozen.frozen(net, "cpu", keep=True)
        t_trust, again = median_time(lambda: _frozen.frozen(net, "cpu", keep=True), args.repeats)
        assert again is trusting and trusting._quick is not None  # checked by version counters
        with torch.no_grad():
            first_weight = next(net.parameters()).view(-1)
            old = first_weight[0].clone()
            first_weight[0] += 1.0  # an in-place write: seen, a new copy
            assert _frozen.frozen(net, "cpu", keep=True) is not trusting
            first_weight[0] = old  # the same bits again
    t_walk, _ = median_time(
        lambda: (_fingerprint.walk(net).hexdigest(), _fingerprint.walk(kept.net).hexdigest()), args.repeats
    )
    tensors = _fingerprint.walk(net).tensors
    pairs = list(zip(tensors, _fingerprint.walk(kept.net).tensors, strict=True))
    t_cmp, _ = median_time(lambda: all(_fingerprint.same_bits(a, b) for a, b in pairs), args.repeats)
    t_read, _ = median_time(lambda: [t.sum() for t in tensors], args.repeats)
    est = LayerVariationalAdapter(net, None)
    t_clone, _ = median_time(lambda: clone(est), args.repeats)
    t_deep, _ = median_time(lambda: copy.deepcopy(net), args.repeats)
    rows = [
        dict(step="frozen copy (a module's first fit)", seconds=t_copy),
        dict(step="digest, every weight hashed (same, cache on)", seconds=t_hash),
        dict(step="walk without hashing (predict's check)", seconds=t_state),
        dict(step="next fit of the unchanged module: all", seconds=t_next),
        dict(step="next fit: bitwise compare with the copy", seconds=t_cmp),
        dict(step="walks of the module and the copy (hooks, ...)", seconds=t_walk),
        dict(step="one read of every weight (floor)", seconds=t_read),
        dict(step="next fit, trust_version_counters=True", seconds=t_trust),
        dict(step="sklearn clone of the estimator (now)", seconds=t_clone),
        dict(step="deepcopy of the extractor (clone before)", seconds=t_deep),
    ]
    for r in rows:
        print(f"{r['step']:<48} {1000 * r['seconds']:9.2f} ms")
    print(f"clone now / before: {t_clone / t_deep:.4f}")
    print(f"next fit / (copy + hash): {t_next / (t_copy + t_hash):.3f}")
    name = "bench_fingerprint_quick" if args.quick else "bench_fingerprint"
    path = write_csv(name, [dict(r, parameters=n_params, modules=n_modules) for r in rows])
    barh_figure(
        name, path, [r["step"] for r in rows], [1000 * r["seconds"] for r in rows],
        "ms (median, log scale)", f"Per-fit costs of keying {n_params / 1e6:.1f} M parameters",
    )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
