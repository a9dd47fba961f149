"""The runner of ``python -m harness.bench``: its arguments (:func:`check_arguments`) and every section
in turn (:func:`main`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from ..errors import HarnessError
from .classification import format_table, merge_repeats, run_classification
from .coco_eval import coco_eval_time
from .common import device_name
from .detection import detection_throughput
from .epoch import epoch_time
from .expert_parallel import expert_parallel_throughput
from .memory import format_memory_table, run_tensor_memory
from .small_cnn import format_small_cnn, small_cnn_epoch_times

# The package docstring's first line (the package imports this module, so not read from it).
DESCRIPTION = "Training-throughput benchmark: dense vs MoE ResNet-18, reference vs fast dispatch, eager vs CUDA graph."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=DESCRIPTION)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="every stage position and the no-capacity padded path")
    parser.add_argument("--batch-size", type=int, help="default: 512 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, help="timed steps per case (default: 30 on CUDA, 3 on CPU)")
    parser.add_argument(
        "--mode",
        action="append",
        choices=["eager", "graph", "compile"],
        help="execution modes (default: eager, plus graph on CUDA)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["classification", "memory", "epoch", "small_cnn", "expert_parallel", "detection", "coco_eval"],
    )
    parser.add_argument(
        "--coco-oracle",
        default="../shared/data/coco-eval-oracle",
        help="folder of the COCO-eval oracle, timed for the evaluation figure",
    )
    parser.add_argument(
        "--mnist-root",
        default="../shared/data/mnist",
        help="the MNIST of the small-CNN epoch (generated images of its size when absent)",
    )
    parser.add_argument(
        "--small-cnn-images",
        type=int,
        metavar="N",
        help="the small-CNN epoch on the first N training images (and N/6 test images), a quick check; default all",
    )
    parser.add_argument(
        "--memory-batch-size",
        type=int,
        default=512,
        help="batch size of the tensor-memory count (default 512, the GPU batch, on any device)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the classification cases this many times: the median ratio and its range",
    )
    parser.add_argument(
        "--only", help="regular expression: benchmark only the cases whose name it matches (dense always)"
    )
    parser.add_argument(
        "--coco-repeats", type=int, default=5, help="COCO evaluation: calls per backend, timed in turns (default 5)"
    )
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise HarnessError("--device cuda: no CUDA device is available")
        device = torch.device(args.device)
        cuda = device.type == "cuda"
        batch_size = args.batch_size or (512 if cuda else 32)
        steps = args.steps or (30 if cuda else 3)
        modes = args.mode or (["eager", "graph"] if cuda else ["eager"])
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if "graph" in modes and not cuda:
            raise HarnessError("--mode graph needs --device cuda")
        result: dict[str, Any] = {
            "device": device_name(device),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "batch_size": batch_size,
            "steps": steps,
            "repeat": args.repeat,
        }
        print(f"# harness.bench on {result['device']}, batch {batch_size}, {steps} timed steps per case", flush=True)
        if "classification" not in args.skip:
            runs = []
            for run in range(args.repeat):
                if args.repeat > 1:
                    print(f"# classification, run {run + 1} of {args.repeat}", flush=True)
                runs.append(
                    run_classification(
                        device, args.full, batch_size, steps, modes, lambda s: print(s, flush=True), args.only
                    )
                )
            rows = merge_repeats(runs)
            result["classification"] = [asdict(r) for r in rows]
            print(format_table(rows), flush=True)
        if "memory" not in args.skip:
            try:
                memory = run_tensor_memory(args.full, args.memory_batch_size, lambda s: print(s, flush=True), args.only)
            except ImportError as exc:  # MemTracker is private PyTorch API: absent from older releases
                result["memory"] = None
                print(f"memory: skipped, this PyTorch cannot count it ({exc})", flush=True)
            else:
                result["memory"] = memory
                print(format_memory_table(memory), flush=True)
        if "epoch" not in args.skip:
            sizes = {} if cuda else {"train_images": 512, "val_images": 256}
            timing = epoch_time(device, batch_size=512 if cuda else 128, **sizes)
            result["epoch"] = timing
            print(
                f"epoch resnet18_moe E4 k2 L4 padded: {timing['train_images']} train + {timing['val_images']} "
                f"val images in {timing['epoch_s']:.2f} s "
                f"(train {timing['train_s']:.2f} s, eval {timing['eval_s']:.2f} s)",
                flush=True,
            )
        if "small_cnn" not in args.skip:
            result["small_cnn"] = small_cnn_epoch_times(device, args.mnist_root, train_images=args.small_cnn_images)
            print(format_small_cnn(result["small_cnn"]), flush=True)
        if "expert_parallel" not in args.skip:
            # Two CPU ranks over gloo on any machine: the harness's expert-parallel exchanges side by side.
            ep_batch = 16 if cuda else batch_size
            speeds = expert_parallel_throughput(2, ep_batch, steps)
            result["expert_parallel"] = {
                "ranks": 2,
                "backend": "gloo",
                "batch_size_per_rank": ep_batch,
                "loop_images_per_s": speeds["loop"],
                "padded_images_per_s": speeds["padded"],
                "padded_vs_loop": speeds["padded"] / speeds["loop"],
            }
            print(
                f"expert parallel resnet18_moe E4 k2 L4, 2 CPU ranks (gloo), batch {ep_batch} per rank: counted "
                f"exchange {speeds['loop']:.1f} img/s, static exchange {speeds['padded']:.1f} img/s "
                f"(x{speeds['padded'] / speeds['loop']:.2f})",
                flush=True,
            )
        if "detection" not in args.skip:
            backbone, size, batch = ("resnet50", 512, 8) if cuda else ("resnet18", 160, 2)
            dense_speed, dense_mem = detection_throughput(False, device, batch, size, steps, backbone)
            moe_speed, moe_mem = detection_throughput(True, device, batch, size, steps, backbone)
            result["detection"] = {
                "backbone": backbone,
                "image_size": size,
                "batch_size": batch,
                "dense_images_per_s": dense_speed,
                "moe_images_per_s": moe_speed,
                "ratio_vs_dense": moe_speed / dense_speed,
                "dense_peak_mem_mib": dense_mem,
                "moe_peak_mem_mib": moe_mem,
            }
            print(
                f"retinanet {backbone} {size}px batch {batch}: dense {dense_speed:.1f} img/s, MoE heads "
                f"{moe_speed:.1f} img/s (x{moe_speed / dense_speed:.2f}); peak {dense_mem:.0f} / {moe_mem:.0f} MiB",
                flush=True,
            )
        if "coco_eval" not in args.skip:
            timing = coco_eval_time(args.coco_oracle, args.coco_repeats)
            result["coco_eval"] = timing
            if timing is None:
                print(f"coco_eval: skipped, no oracle at {args.coco_oracle}", flush=True)
            else:
                print(
                    f"coco_eval: {timing['images']} images, {timing['detections']} detections, median of "
                    f"{timing['repeats']} calls timed in turns\n\n| backend | seconds | AP | speed vs pycocotools |\n"
                    "|---|---|---|---|",
                    flush=True,
                )
                for name, row in timing["backends"].items():
                    speed = timing["seconds"] / row["seconds"] if row else None
                    cells = f"{row['seconds']:.3f} | {row['ap']:.3f} | x{speed:.1f}" if row else "not installed | | "
                    print(f"| {name} | {cells} |", flush=True)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from ..storage import Location

        try:
            Location(args.json).write_bytes(json.dumps(result, indent=2).encode())
        except OSError as exc:
            print(f"error: --json: cannot write {args.json} ({exc})", file=sys.stderr)
            return 2
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything runs (a full run takes minutes): sizes must be positive, ``--only``
    a regular expression, and the folder of ``--json`` writable."""
    for flag in ("batch_size", "steps", "memory_batch_size", "repeat"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise HarnessError(f"--{flag.replace('_', '-')}: must be a positive integer, got {value}")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as exc:
            raise HarnessError(f"--only: not a regular expression ({exc})") from None
    if args.json:
        from ..storage import Location

        folder = Location(args.json).parent
        try:
            folder.check_writable()
        except OSError as exc:
            raise HarnessError(f"--json: {folder} is not writable ({exc})") from None
