"""What people read on the console: one short line per epoch, a progress bar over an epoch's steps (on
a terminal only), the placement table. The full metrics go to the tables, and to the console with
``--verbose``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from .metrics.names import main_metric

# Every per-epoch figure of the verbose line, in this order, then every per-layer summary.
VERBOSE_KEYS = (
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "val_ap",
    "val_ap50",
    "val_ap_small",
    "val_ap_medium",
    "val_ap_large",
    "images_per_s",
    "epoch_s",
)


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """``epoch 2/10 | loss 2.31 | val_top1 0.412 | moe0 cv 0.12 alive 4/4 | 3.1 s``: the training loss,
    the main metric, and per MoE layer the importance CV and the living experts."""
    main = main_metric(metrics)
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}", f"loss {metrics['train_loss']:.4g}"]
    if main in metrics:
        parts.append(f"{main} {metrics[main]:.4g}")
    layers = sorted({int(m[1]) for key in metrics if (m := re.match(r"moe(\d+)_importance_cv$", key))})
    for i in layers:
        experts = sum(1 for key in metrics if re.fullmatch(rf"moe{i}_expert\d+_importance_share", key))
        alive = metrics.get(f"moe{i}_living_experts")
        alive_text = f" alive {alive:.0f}/{experts}" if alive is not None and experts else ""
        parts.append(f"moe{i} cv {metrics[f'moe{i}_importance_cv']:.3g}{alive_text}")
    parts.append(f"{metrics.get('epoch_s', 0.0):.1f} s")
    return " | ".join(parts)


def verbose_line(metrics: dict[str, Any], epochs: int) -> str:
    """Every per-epoch figure and every per-layer summary (``--verbose``); the per-expert shares stay in
    the tables."""
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}"]
    parts += [f"{key} {metrics[key]:.4g}" for key in VERBOSE_KEYS if key in metrics]
    parts += [
        f"{key} {value:.4g}"
        for key, value in metrics.items()
        if re.match(r"moe\d+_(?!expert\d)", key) and isinstance(value, (int, float))
    ]
    return " | ".join(parts)


def step_progress(batches: Iterable[Any], total: int, epoch: int, epochs: int) -> Iterator[Any]:
    """``batches`` with a progress bar over the epoch's ``total`` steps on stderr when it is a terminal
    (tqdm, cleared when the epoch ends); unchanged elsewhere (CI logs, ``ray job logs``)."""
    if not sys.stderr.isatty():
        return iter(batches)
    from tqdm import tqdm

    return iter(
        tqdm(batches, total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, dynamic_ncols=True)
    )


def placement_table(placement: list[dict[str, Any]]) -> str:
    """Which experts of which MoE layer live on which rank and node, one line per rank."""
    lines = ["placement:"]
    for worker in placement:
        where = f"node {worker.get('node_id') or 'local'}" + (
            f" gpu {worker['gpu_id']}" if worker.get("gpu_id") is not None else ""
        )
        experts = "; ".join(f"moe{layer} experts {ids}" for layer, ids in worker["experts"].items())
        lines.append(f"  rank {worker['rank']} ({where}): {experts or 'no MoE layers'}")
    return "\n".join(lines)


# The figures a run's closing summary shows without --verbose.
SUMMARY_KEYS = ("epoch", *VERBOSE_KEYS)
SUMMARY_PATTERN = (
    r"moe\d+_(importance_cv|load_cv|living_experts|mutual_info_bits|usage_entropy_bits)|val_(top1|ap|ap50)_k\d+"
)


def summary_lines(metrics: dict, verbose: bool) -> list[str]:
    """``  key = value`` per numeric metric of the summary (all of them with ``verbose``)."""
    return [
        f"  {key} = {value:.6g}"
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and (verbose or key in SUMMARY_KEYS or re.fullmatch(SUMMARY_PATTERN, key))
    ]
