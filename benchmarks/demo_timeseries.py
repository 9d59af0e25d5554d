"""Demo: adapt a pretrained network to a shifted time series with one closed-form solve.

The paper's experiment 1 (Tseng et al., ICLR 2023): a 1-64-64-1 ReLU network is pretrained on
x = sin(5 pi t) and adapted to a shifted, amplified, noisy target domain by updating its
last layer with LayerVariationalAdapter. Prints the target error (sum of squared errors)
of the pretrained and adapted networks and the fit time.

    python benchmarks/demo_timeseries.py          # 5000 pretraining epochs, 10-60 s on 2 cores
    python benchmarks/demo_timeseries.py --quick  # 500 pretraining epochs, for a smoke test
"""

import time

import numpy as np
import torch
from _common import median_time, parser, predict_torch, pretrain, sse, timeseries_setup

from skl_transfer import LayerVariationalAdapter


def main(argv=None):
    args = parser(__doc__, quick_help="500 pretraining epochs, no cache").parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    t, x, t_new, x_new, net = timeseries_setup()
    epochs = 500 if args.quick else 5000
    t0 = time.perf_counter()
    net, cached = pretrain(net, t, x, epochs=epochs, name=None if args.quick else "exp1_pretrained")
    how = "loaded from benchmarks/.cache" if cached else f"{epochs} full-batch Adam epochs"
    print(f"pretrained on the source domain ({how}, {time.perf_counter() - t0:.1f} s)")
    body, head = net[:-1], net[-1]

    # The paper's setting: adapt on all 2000 target points and measure on the same points.
    # cache off: each timed fit runs the network (repeats would otherwise come from the cache)
    fit_time, lva = median_time(
        lambda: LayerVariationalAdapter(body, head, alpha=0.0, cache=False).fit(t_new, x_new)
    )
    # A held-out measure: adapt on a random half, test on the other half.
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(t_new))
    train, test = idx[: len(idx) // 2], idx[len(idx) // 2 :]
    held = LayerVariationalAdapter(body, head, alpha=0.0).fit(t_new[train], x_new[train])

    rows = [
        (
            "pretrained",
            sse(x_new, predict_torch(net, t_new)),
            sse(x_new[test], predict_torch(net, t_new[test])),
        ),
        ("LVA (alpha=0)", sse(x_new, lva.predict(t_new)), sse(x_new[test], held.predict(t_new[test]))),
    ]
    print(
        f"\ntarget-domain sum of squared errors (transferal residue {lva.residue_norm_:.2f} -> "
        f"{lva.residual_norm_:.2f} after the update)"
    )
    print(f"{'model':<16}{'SSE, 2000 pts (paper)':>24}{'SSE, 1000 held-out':>22}")
    for name, all_pts, held_out in rows:
        print(f"{name:<16}{all_pts:>24.1f}{held_out:>22.1f}")
    print(
        f"\nLVA fit time: {fit_time * 1e3:.1f} ms, median of 5 fits "
        f"(one forward pass + one {lva.solver_} solve)"
    )
    return rows


if __name__ == "__main__":
    main()
