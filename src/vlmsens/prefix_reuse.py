"""A stack of layers' BF16 outputs per batch, recorded once and reused up to the first quantized layer.

The stacks are the text decoder layers (:class:`TextPrefixReuse`) and the vision tower's blocks
(``vlmsens.vision_reuse``). A configuration whose earliest quantized group sits in layer b of a
stack (and nothing quantized before the stack) computes in layers 0..b-1 exactly what the BF16
reference computed, so validation need not run them again: during the reference pass every
layer's output is recorded (GBs at full size: on the GPU while a memory budget holds them, on the
host beyond it), and while a configuration is measured layer b-1 hands back its recorded output and
the layers before it hand back their input unchanged (a value layer b-1 then ignores). The model's
own forward still runs around them, so rotary embeddings, masks and Qwen3-VL's deepstack additions
after the first text layers are applied by transformers as shipped; the recorded output is the
layer's own (a forward hook's), before any such addition, so what the model adds after layer b-1 it
adds as in the reference. A layer whose output is also read outside the stack (Qwen3-VL's vision
blocks that feed its deepstack mergers) hands back its own recorded output when skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import VlmsensError
from .families import VISION_PATTERNS, block_index, tower_of


def text_layers(model, vision_patterns: tuple[str, ...] = VISION_PATTERNS) -> tuple[str, Any] | None:
    """The name and ModuleList of the language model's decoder layers, or None when there is not exactly one."""
    import torch

    named = getattr(model, "named_modules", None)
    if named is None:
        return None
    found = [(name, module) for name, module in named() if isinstance(module, torch.nn.ModuleList)
             and name.rsplit(".", 1)[-1] == "layers" and tower_of(name, vision_patterns) == "text"]
    return found[0] if len(found) == 1 and len(found[0][1]) else None


def _hidden_states(args: tuple, kwargs: dict):
    return args[0] if args else kwargs["hidden_states"]


class LayerPrefixReuse:
    """Each output of a stack of layers run one after another, per batch (by a key the caller keeps
    per batch), recorded in a reference pass, and the skip of a prefix of the stack.

    ``supported`` is false when there is no stack or a layer does not return a bare tensor (older
    transformers returned tuples); nothing is then recorded or skipped. The layers' own ``forward``
    is replaced only inside :meth:`skipping`, so calibration and the search never see it.

    ``taps``: the layers whose outputs the model also reads outside the stack (Qwen3-VL's vision
    tower hands some blocks' outputs to its deepstack mergers); skipped, they hand back their recorded
    output, not their input, so what reads them gets what the reference got.

    ``device_budget_bytes``: how much GPU memory the process may reserve in all; recordings stay on
    the GPU while the caching allocator's reserved memory plus the recording fits it (the forwards
    that follow reuse what the reference's own activations reserved), and go to pinned host memory
    beyond. None: every recording goes to the host.
    """

    def __init__(self, layers, device_budget_bytes: float | None = None, taps: Iterable[int] = ()):
        self.layers = layers if layers is not None and len(layers) else None
        self.supported = self.layers is not None
        self.taps = frozenset(taps)
        self.device_budget_bytes = device_budget_bytes
        self._outputs: dict[Any, list[Any]] = {}

    @property
    def n_layers(self) -> int:
        return len(self.layers) if self.supported else 0

    def has(self, key: Any) -> bool:
        return key in self._outputs

    def clear(self) -> None:
        self._outputs.clear()

    def recording_counts(self) -> dict[str, int]:
        """How many recorded layer outputs are on the GPU and how many on the host."""
        recorded = [output for outputs in self._outputs.values() for output in outputs]
        on_device = sum(output.is_cuda for output in recorded)
        return {"on_device": on_device, "on_host": len(recorded) - on_device}

    def _keep_on_device(self, tensor) -> bool:
        import torch

        if self.device_budget_bytes is None or not tensor.is_cuda:
            return False
        size = tensor.numel() * tensor.element_size()
        return torch.cuda.memory_reserved(tensor.device) + size <= self.device_budget_bytes

    @contextlib.contextmanager
    def recording(self, key: Any) -> Iterator[None]:
        """Record every layer's output of the forward run inside, as batch ``key``'s."""
        import torch

        if not self.supported:
            yield
            return
        outputs: list[Any] = [None] * self.n_layers

        # a forward hook sees the layer's own output, before the model adds anything to it (deepstack)
        def hook(index):
            def record(module, args, output):
                if not isinstance(output, torch.Tensor):
                    outputs[index] = None
                elif self._keep_on_device(output):
                    outputs[index] = output.detach().clone()
                else:
                    # asynchronous, into pinned host memory: a synchronous copy per layer cost ~3.5 s per
                    # reference pass at full size (H100), in stream order with every later use
                    outputs[index] = output.detach().to("cpu", non_blocking=True)
            return record

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if any(o is None for o in outputs):
            # a layer returned something else than its hidden state (a tuple): replaying it would need its structure
            self.supported = False
            self._outputs.clear()
        else:
            self._outputs[key] = outputs

    @contextlib.contextmanager
    def skipping(self, key: Any, start: int) -> Iterator[int]:
        """Run the forward inside with layers 0..start-1 not computing; yields how many are skipped.

        Only valid when those layers compute what they computed when batch ``key`` was recorded.
        """
        start = min(start, self.n_layers) if self.has(key) else 0
        if start <= 0:
            yield 0
            return
        recorded = self._outputs[key]

        # cheaper than replaying each: what the layers before start-1 return (and what the model adds
        # to it, e.g. Qwen3-VL's deepstack features) only feeds layer start-1, which ignores its input;
        # a tapped layer's output is read elsewhere too, so it replays its own
        def pass_through(*args, **kwargs):
            return _hidden_states(args, kwargs)

        def replay_of(index: int):
            def replay(*args, **kwargs):
                hidden, output = _hidden_states(args, kwargs), recorded[index]
                if hidden.shape != output.shape:
                    raise VlmsensError(f"layer {index}'s recorded output {tuple(output.shape)} does not fit "
                                       f"the batch {tuple(hidden.shape)}: recorded for another batch")
                return output.to(hidden.device, hidden.dtype, non_blocking=True)
            return replay

        patched = list(self.layers)[:start]
        saved = [layer.__dict__.get("forward") for layer in patched]
        try:
            for i, layer in enumerate(patched):
                layer.forward = replay_of(i) if i == start - 1 or i in self.taps else pass_through
            yield start
        finally:
            for layer, forward in zip(patched, saved, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward


class TextPrefixReuse(LayerPrefixReuse):
    """The language model's decoder layers as a :class:`LayerPrefixReuse`, and where a configuration's changes start."""

    def __init__(self, model, vision_patterns: tuple[str, ...] = VISION_PATTERNS, device_budget_bytes: float | None = None):
        found = text_layers(model, vision_patterns)
        self.name = found[0] if found is not None else ""
        self.vision_patterns = vision_patterns
        super().__init__(found[1] if found is not None else None, device_budget_bytes)

    def start_layer(self, quantized_modules: Iterable[str]) -> int:
        """The first text layer whose output a configuration quantizing these modules (groups' names count too) changes.

        Every layer when only the head is quantized (or nothing); 0 for a module outside the
        decoder layers that is not the head (vision tower, embeddings), which changes every layer's input.
        """
        start = self.n_layers
        prefix = f"{self.name}."
        for name in quantized_modules:
            if tower_of(name, self.vision_patterns) == "head":
                continue
            index = block_index(name) if name.startswith(prefix) else None
            if index is None:
                return 0
            start = min(start, index)
        return start
