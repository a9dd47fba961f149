"""Training-throughput benchmark: dense vs MoE ResNet-18, reference vs fast dispatch, eager vs CUDA graph.

``python -m harness.bench [--device cpu|cuda] [--full] [--json PATH]``

Every case trains (forward, backward, Adam step; CE + importance loss) on one fixed batch already on the
device, so the figure is the model's speed, not the input pipeline's. MoE cases route as a balanced model
does (:func:`spread_routing`): a freshly initialised gate sends every random image to the same expert,
which would time a different model (one busy expert, the others idle and skipped by Adam). On CUDA: bf16
autocast and channels_last. Ratios are against the dense model measured in the same run and the same execution mode
(eager or one CUDA graph per training step). The cases of one MoE layer are timed in turns with a dense
model of their own (:func:`interleaved_step_seconds`), so a machine's drift does not decide which dispatch
wins. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU (reset per
case through ``/proc/self/clear_refs``), each less what the other cases alive beside it hold.

An ``epoch`` section times one whole CIFAR-100-sized epoch (50k train + 10k eval images, synthetic,
GPU-resident) through the harness's own train loop; ``expert_parallel`` trains expert-parallel on two
spawned CPU ranks (gloo) with the counted and the static all-to-all; ``detection`` compares RetinaNet
with RetinaNet-MoE heads; ``coco_eval`` times COCOeval on the shared oracle.
"""

from .classification import (
    COMPILED_CASES,
    MEMORY_FIELDS,
    PreparedCase,
    Row,
    case_groups,
    format_table,
    measure_group,
    merge_repeats,
    prepare_case,
    run_classification,
)
from .coco_eval import coco_eval_time
from .common import (
    CIFAR_CLASSES,
    NO_KERNEL_OPS,
    Case,
    OpCounter,
    classification_cases,
    count_ops,
    device_name,
    interleaved_step_seconds,
    make_step,
    routing_stats,
    spread_routing,
)
from .detection import detection_throughput
from .epoch import epoch_time
from .expert_parallel import EXPERT_PARALLEL_DISPATCHES, expert_parallel_throughput
from .memory import MEMORY_KINDS, format_memory_table, group_experts, run_tensor_memory, tensor_memory
from .run import check_arguments, main

__all__ = [
    # common
    "CIFAR_CLASSES",
    "NO_KERNEL_OPS",
    "Case",
    "OpCounter",
    "classification_cases",
    "count_ops",
    "device_name",
    "interleaved_step_seconds",
    "make_step",
    "routing_stats",
    "spread_routing",
    # classification
    "COMPILED_CASES",
    "MEMORY_FIELDS",
    "PreparedCase",
    "Row",
    "case_groups",
    "format_table",
    "measure_group",
    "merge_repeats",
    "prepare_case",
    "run_classification",
    # memory
    "MEMORY_KINDS",
    "format_memory_table",
    "group_experts",
    "run_tensor_memory",
    "tensor_memory",
    # epoch, expert_parallel, detection, coco_eval
    "epoch_time",
    "EXPERT_PARALLEL_DISPATCHES",
    "expert_parallel_throughput",
    "detection_throughput",
    "coco_eval_time",
    # runner
    "check_arguments",
    "main",
]
