"""How a training step runs (``train.step``): eager, through ``torch.compile``, or as one CUDA graph.

:func:`resolve_step_mode` decides from the config and the device alone (a pure function; it says why
when the run gets eager instead); :func:`build_step_runner` builds what :func:`harness.training.loop.train_one_epoch`
calls once per batch and what evaluation calls as the model. The CUDA graph pieces (:func:`side_stream`,
:func:`capture_graph`) are the bench's too. The rules, and what is still to be measured on a GPU, are in
docs/performance.md ("Step modes").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..config import DETECTION_DATASETS, RunConfig
from ..errors import TrainingError
from ..moe.dispatch import PaddedDispatcher, SortedDispatcher
from ..moe.layer import build_dispatcher
from ..moe.parallel import moe_layers
from ..tasks.base import Session, StepResult, Task, autocast_context
from .steps import optimizer_step, optimizer_update, warmup_lr

LOG = logging.getLogger(__name__)
STEP_MODES = ("eager", "compile", "graph")
# Eager steps (real batches, counted as training) on a side stream before the capture: lazy state (Adam's
# moments, cuDNN's algorithm choice, the allocator's pools) exists before the graph records addresses.
GRAPH_WARMUP_STEPS = 3
# Whether ``train.step: auto`` picks the CUDA graph on CUDA. Off until cluster/gpu_check.sh has passed on a
# GPU: the graph path is written to PyTorch's recipe and tested on CPU only, and it changes an epoch's
# images (the smaller last batch is skipped), so until a GPU has measured it, it is opt-in (train.step:
# graph) and the default keeps every run eager.
AUTO_GRAPH_ON_CUDA = False


def _static_dispatch_blocker(config: RunConfig, mode: str) -> str | None:
    """Why the MoE layers need the host every step (loop and sorted dispatch read token counts), or None."""
    moe = config.moe if config.model.name.endswith("_moe") else None
    if moe is None or moe.routing.type == "soft":  # Soft MoE's slots are dense: no dispatcher, no host read
        return None
    dispatch = "padded" if moe.dispatch == "auto" and moe.routing.type == "expert_choice" else moe.dispatch
    dispatcher = build_dispatcher(dispatch, moe.capacity_factor)  # the rule the model builder follows
    if isinstance(dispatcher, PaddedDispatcher):
        return None
    named = f"moe.dispatch {moe.dispatch}" + (" (sorted without a capacity_factor)" if moe.dispatch == "auto" else "")
    if isinstance(dispatcher, SortedDispatcher):
        why = "one host read per MoE layer (the experts' token counts)"
    else:
        why = "one host read per expert and layer (its token count)"
    effect = "a recompile or graph break per layer" if mode == "compile" else "not capturable"
    return f"{named}: {why}, {effect}; set moe.dispatch: padded"


def graph_blocker(
    config: RunConfig, device: torch.device, world_size: int = 1, expert_parallel: bool = False
) -> str | None:
    """Why the training step of ``config`` on ``device`` cannot be one CUDA graph, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (device {device.type})"
    if config.data.name in DETECTION_DATASETS:
        return "detection: RetinaNet takes images of varying sizes and decodes boxes with host-side control flow"
    if world_size > 1 or expert_parallel:
        return f"{world_size} ranks: the gradient sync and routing exchanges are not captured (one process only)"
    if config.optim.name == "sgd":
        return (
            "optim.name sgd: only Adam and AdamW are captured "
            "(their fused step reads the learning rate from the device)"
        )
    moe = config.moe if config.model.name.endswith("_moe") else None
    if moe is not None and moe.gate.type == "attentive":
        return (
            "moe.gate.type attentive: its layer runs every expert on every token through a path never captured "
            "on a GPU yet"
        )
    return _static_dispatch_blocker(config, "graph")


def compile_blocker(config: RunConfig, world_size: int = 1, expert_parallel: bool = False) -> str | None:
    """Why ``config``'s model is not compiled, or None when it is."""
    if config.data.name in DETECTION_DATASETS:
        return "detection: RetinaNet takes images of varying sizes (a recompile per size); not compiled"
    if world_size > 1 or expert_parallel:
        return f"{world_size} ranks: compiling is tried in one process only"
    return _static_dispatch_blocker(config, "compile")


def resolve_step_mode(
    config: RunConfig, device: torch.device, world_size: int = 1, expert_parallel: bool = False
) -> tuple[str, str | None]:
    """``(mode, reason)``: the step mode ``train.step`` gets on ``device`` (one of :data:`STEP_MODES`) and,
    when that is eager though ``auto``, ``compile`` or ``graph`` was asked for, why. ``auto`` is eager while
    :data:`AUTO_GRAPH_ON_CUDA` is off; with it on, graph on CUDA when the model is capturable
    (:func:`graph_blocker`), else eager."""
    wanted = config.train.step
    if wanted == "eager":
        return "eager", None
    if wanted == "auto" and not AUTO_GRAPH_ON_CUDA:
        return "eager", (
            "train.step auto: eager until the CUDA graph path has been verified on a GPU "
            "(cluster/gpu_check.sh); set train.step: graph to use it"
        )
    blocker = (
        compile_blocker(config, world_size, expert_parallel)
        if wanted == "compile"
        else graph_blocker(config, device, world_size, expert_parallel)
    )
    if blocker is None:
        return ("compile" if wanted == "compile" else "graph"), None
    return "eager", f"train.step {wanted}: {blocker}; eager"


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a side stream that waits for the current one, and make the current one wait for
    it afterwards: warm-up before a capture, as PyTorch's whole-network capture recipe does it."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


@contextlib.contextmanager
def capturable(optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[None]:
    """Every param group ``capturable`` while the block runs: the optimizers refuse a capture otherwise.
    Their fused steps already keep the step count on the device, so this changes no update."""
    saved = [[group.get("capturable", False) for group in o.param_groups] for o in optimizers]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["capturable"] = True
    try:
        yield
    finally:
        for optimizer, flags in zip(optimizers, saved):
            for group, flag in zip(optimizer.param_groups, flags):
                group["capturable"] = flag


def capture_graph(
    run: Callable[[], Any], optimizers: Sequence[torch.optim.Optimizer] = (), pool: Any = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``run()`` captured (not run) as one CUDA graph; returns the graph and ``run``'s outputs, whose
    tensors every ``replay()`` overwrites. Warm up first (:func:`side_stream`); ``optimizers`` stepped
    inside are made :func:`capturable`; ``pool``: a memory pool shared with other graphs."""
    graph = torch.cuda.CUDAGraph()
    with capturable(optimizers), torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


def make_dispatch_static(model: nn.Module, device: torch.device) -> None:
    """Every padded MoE layer of ``model`` on a static execution (no host read, no data-dependent shape),
    its masked BatchNorms in place before anything traces the model (see
    :meth:`~harness.moe.dispatch.PaddedDispatcher.make_static`)."""
    for layer in moe_layers(model):
        if isinstance(layer.dispatcher, PaddedDispatcher):
            layer.dispatcher.make_static(layer.experts, device)


class EagerStep:
    """One training step as the loop has always run it: the task's losses summed under autocast,
    ``zero_grad``, backward, :func:`~harness.training.steps.optimizer_step`. ``step(batch, epoch, index) ->
    (loss, StepResult)`` (``index`` from 0); ``eval_model`` is what evaluation calls."""

    mode = "eager"
    idle_rule = True  # experts without tokens get no update (sync_gradients)

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RunConfig,
        device: torch.device,
        session: Session,
    ) -> None:
        self.task, self.model, self.optimizer, self.config, self.device, self.session = (
            task,
            model,
            optimizer,
            config,
            device,
            session,
        )
        self.reduce = session.collective.sum if session.collective.world_size > 1 else None
        self.forward_model: nn.Module = model
        self.eval_model: nn.Module = model

    def __call__(self, batch: Any, epoch: int, index: int) -> tuple[torch.Tensor, StepResult] | None:
        with autocast_context(self.config, self.device):
            result = self.task.forward(self.forward_model, batch, self.config, self.reduce)
        loss = sum(result.losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(self.model, self.optimizer, self.config, epoch, index, self.session, self.idle_rule)
        return loss, result


class CompiledStep(EagerStep):
    """:class:`EagerStep` on ``torch.compile(model, backend=train.compile_backend)`` (forward, and its
    backward through AOTAutograd; the optimizer step stays eager, fused Adam is one kernel already), the
    padded dispatch made static first. Evaluation calls the same compiled model (one more trace, for
    eval mode)."""

    mode = "compile"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        make_dispatch_static(self.model, self.device)
        self.forward_model = self.eval_model = torch.compile(self.model, backend=self.config.train.compile_backend)


class GraphedStep(EagerStep):
    """The training step as one CUDA graph: forward, backward and optimizer step captured together, after
    :data:`GRAPH_WARMUP_STEPS` eager steps on a side stream, then replayed with each batch copied into the
    static input tensors (PyTorch's whole-network capture recipe).

    - Static shapes: the graph holds batches of ``data.batch_size`` rows; a smaller batch (an epoch's last)
      is skipped (returns None; the loop counts only the images it trained on).
    - Learning rate: captured as one device tensor per param group, filled from the group's ``lr`` (the
      scheduler's and the warm-up's) before every replay; the groups keep plain floats otherwise.
    - Captured once per runner (a run, or a restart from a checkpoint): the optimizer's state must not be
      replaced after the capture; the routers' k and train/eval mode are the capture's.
    - Experts that get no token in a step get zero gradients (so Adam's moments still move them): the
      captured step cannot decide on the host which experts were idle, so the warm-up steps and the graph
      keep the zero gradients alike (``idle_rule`` off; :func:`~harness.moe.parallel.sync_gradients`).
    - ``strict`` (``train.step: graph``): a failed capture raises; else (``auto``) one log line and eager
      steps from then on. No shard holding a full batch: eager, with its log line.
    """

    mode = "graph"
    idle_rule = False

    def __init__(self, *args: Any, strict: bool = False) -> None:
        super().__init__(*args)
        make_dispatch_static(self.model, self.device)
        self.strict = strict
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: list[torch.Tensor] = []
        self.outputs: tuple[torch.Tensor, StepResult] | None = None
        self.lrs = [torch.zeros((), device=self.device) for _ in self.optimizer.param_groups]
        self.warmed_up = 0
        self.fallback: str | None = None
        self.skipped_logged = False
        self.eval_model = GraphedForward(self.model, self.config, self.device, strict)

    def _abandon(self, reason: str) -> None:
        # From here every step is an eager one, so experts without tokens get no update again.
        self.fallback, self.mode, self.idle_rule = reason, "eager", True
        LOG.warning("train.step graph: %s; eager from here", reason)

    def __call__(self, batch: Any, epoch: int, index: int) -> tuple[torch.Tensor, StepResult] | None:
        if self.fallback is not None:
            return super().__call__(batch, epoch, index)
        leaves = tree_flatten(batch)[0]
        full = leaves[0].shape[0] == self.config.data.batch_size
        if self.static_batch:
            full = [t.shape for t in leaves] == [t.shape for t in self.static_batch]
        if not full and self.warmed_up == 0:
            self._abandon(
                f"the first batch has {leaves[0].shape[0]} rows, fewer than data.batch_size "
                f"{self.config.data.batch_size} (no full batch to capture)"
            )
            return super().__call__(batch, epoch, index)
        if not full:
            if not self.skipped_logged:
                LOG.info("train.step graph: a batch of %d rows (an epoch's last) is skipped", leaves[0].shape[0])
                self.skipped_logged = True
            return None
        if self.warmed_up < GRAPH_WARMUP_STEPS:
            self.warmed_up += 1
            with side_stream(self.device):
                return super().__call__(batch, epoch, index)
        warmup_lr(self.optimizer, self.config, epoch, index)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        if self.graph is None:
            try:
                self._capture(batch)
            except RuntimeError as exc:
                if self.strict:
                    raise TrainingError(f"train.step graph: capture failed ({str(exc).splitlines()[0]})") from exc
                self.graph = None
                self._abandon(f"capture failed ({str(exc).splitlines()[0]})")
                return super().__call__(batch, epoch, index)
        else:
            for static, tensor in zip(self.static_batch, leaves):
                static.copy_(tensor, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _capture(self, batch: Any) -> None:
        stateless = sum(p not in self.optimizer.state for g in self.optimizer.param_groups for p in g["params"])
        if stateless:  # their optimizer state would be created inside the graph, and reset by every replay
            raise RuntimeError(f"{stateless} parameters got no gradient in the warm-up steps")
        static = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batch)
        self.static_batch = tree_flatten(static)[0]

        def step() -> tuple[torch.Tensor, StepResult]:
            with autocast_context(self.config, self.device, cache_enabled=False):
                result = self.task.forward(self.model, static, self.config, self.reduce)
            loss = sum(result.losses.values())
            loss.backward()
            optimizer_update(self.model, self.optimizer, self.config, self.session, self.idle_rule)
            return loss, result

        # The recipe: no gradient tensors before the capture, so backward allocates them in the graph's
        # pool and every replay writes them afresh (no zero_grad inside).
        self.optimizer.zero_grad(set_to_none=True)
        floats = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        try:
            self.graph, self.outputs = capture_graph(step, [self.optimizer])
        finally:
            for group, value in zip(self.optimizer.param_groups, floats):
                group["lr"] = value


class GraphedForward(nn.Module):
    """Evaluation through CUDA graphs: ``model``'s no-grad, eval-mode forward captured once per input
    shape and the routers' k (``train.test_time_k`` changes it), after one eager forward on a side stream
    (that batch's result), then replayed; every batch, the last and smaller one too, gets its graph, so
    nothing is padded or left out. The metrics are accumulated eagerly from each replay's outputs. In
    training mode or with gradients it is ``model`` itself. ``images: [N, C, H, W]`` -> ``model``'s output."""

    def __init__(self, model: nn.Module, config: RunConfig, device: torch.device, strict: bool = False) -> None:
        super().__init__()
        self.model, self.config, self.device, self.strict = model, config, device, strict
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self.pool: Any = None
        self.eager = False

    def forward(self, images: torch.Tensor) -> Any:
        if self.eager or self.model.training or torch.is_grad_enabled() or not isinstance(images, torch.Tensor):
            return self.model(images)
        key = (
            tuple(images.shape),
            images.stride(),
            images.dtype,
            tuple(layer.router.k for layer in moe_layers(self.model)),
        )
        if key in self.graphs:
            graph, static, outputs = self.graphs[key]
            static.copy_(images, non_blocking=True)
            graph.replay()
            return outputs
        with side_stream(self.device), autocast_context(self.config, self.device, cache_enabled=False):
            result = self.model(images)
        static = images.clone()

        def forward() -> Any:
            with autocast_context(self.config, self.device, cache_enabled=False):
                return self.model(static)

        try:
            # One pool for every evaluation graph: they replay one at a time, and each keeps its outputs.
            self.pool = self.pool if self.pool is not None else torch.cuda.graph_pool_handle()
            graph, outputs = capture_graph(forward, pool=self.pool)
            self.graphs[key] = (graph, static, outputs)
        except RuntimeError as exc:
            if self.strict:
                raise
            self.eager = True
            LOG.warning(
                "train.step graph: evaluation capture failed (%s); eager evaluation from here", str(exc).splitlines()[0]
            )
        return result


def build_step_runner(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    device: torch.device,
    session: Session,
) -> EagerStep:
    """The step runner ``train.step`` resolves to on ``device`` (:func:`resolve_step_mode`), logging one
    line when that is eager though ``compile`` or ``graph`` was asked for (or ``auto`` on CUDA)."""
    mode, reason = resolve_step_mode(config, device, session.collective.world_size, session.expert_parallel)
    if reason is not None:
        quiet = config.train.step == "auto"  # eager is what auto means there (or, for now, anywhere)
        LOG.log(logging.INFO if quiet else logging.WARNING, reason)
    args = (task, model, optimizer, config, device, session)
    if mode == "compile":
        return CompiledStep(*args)
    if mode == "graph":
        return GraphedStep(*args, strict=config.train.step == "graph")
    return EagerStep(*args)
