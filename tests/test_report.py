"""Report plots that need no Ray: the detection figures from hand-made comparison/affinity frames."""

import matplotlib.image
import pandas as pd

from harness.report import plot_affinity, plot_ap_by_size
from harness.storage import Location


def test_ap_by_size_and_size_affinity_plots(tmp_path):
    rows = []
    for method, base in (("importance_loss", 0.2), ("relative_importance", 0.1)):
        for i, metric in enumerate(("val_ap_small", "val_ap_medium", "val_ap_large")):
            mean = base + 0.1 * i
            rows.append({"sweep.method": method, "metric": metric, "n": 3, "mean": mean, "std": 0.01,
                         "ci95_low": mean - 0.02, "ci95_high": mean + 0.02})
    rows.append({"sweep.method": "importance_loss", "metric": "val_ap", "n": 3, "mean": 0.3, "std": 0.0,
                 "ci95_low": 0.3, "ci95_high": 0.3})
    target = tmp_path / "ap_by_size.png"
    assert plot_ap_by_size(pd.DataFrame(rows), Location(target))
    assert matplotlib.image.imread(target).shape[0] > 100
    assert not plot_ap_by_size(pd.DataFrame(rows[-1:]), Location(tmp_path / "none.png"))  # no size metrics

    affinity = pd.DataFrame([
        {"trial": "t0000", "layer": 0, "expert": e, "group_kind": "object_size", "group": g, "share": 1.0 if e == g else 0.0}
        for e in range(3) for g in range(3)
    ])
    assert plot_affinity(affinity, {"importance_loss": "t0000"}, "object_size", Location(tmp_path / "aff.png"))
    assert (tmp_path / "aff.png").read_bytes()[:4] == b"\x89PNG"
