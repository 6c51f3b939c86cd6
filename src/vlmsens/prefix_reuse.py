"""The BF16 text decoder layers' outputs per batch, recorded once and reused up to the first quantized layer.

A configuration whose earliest quantized group sits in text layer b (its vision tower BF16)
computes in layers 0..b-1 exactly what the BF16 reference computed, so validation need not run
them again: during the reference pass every text layer's output is recorded (GBs at full size: on
the GPU while a memory budget holds them, on the host beyond it), and while a configuration is
measured layer b-1 hands back its recorded output and the layers before it hand back their input
unchanged (a value layer b-1 then ignores). The model's own forward still runs around them, so rotary embeddings, masks and
Qwen3-VL's deepstack additions after the first layers are applied by transformers as shipped; the
recorded output is the layer's own (a forward hook's), before any such addition, so what the
model adds after layer b-1 it adds as in the reference.
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


class TextPrefixReuse:
    """Each text layer's BF16 output per batch (by a key the caller keeps per batch), and the skip of a prefix of layers.

    ``supported`` is false when the decoder layers cannot be found or do not return a bare tensor
    (older transformers returned tuples); nothing is then recorded or skipped. The layers' own
    ``forward`` is replaced only inside :meth:`skipping`, so calibration and the search never see it.

    ``device_budget_bytes``: how much GPU memory the process may reserve in all; recordings stay on
    the GPU while the caching allocator's reserved memory plus the recording fits it (the forwards
    that follow reuse what the reference's own activations reserved), and go to pinned host memory
    beyond. None: every recording goes to the host.
    """

    def __init__(self, model, vision_patterns: tuple[str, ...] = VISION_PATTERNS, device_budget_bytes: float | None = None):
        found = text_layers(model, vision_patterns)
        self.name, self.layers = found if found is not None else ("", None)
        self.vision_patterns = vision_patterns
        self.supported = found is not None
        self.device_budget_bytes = device_budget_bytes
        self._outputs: dict[Any, list[Any]] = {}

    @property
    def n_layers(self) -> int:
        return len(self.layers) if self.supported else 0

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
        """Record every text layer's output of the forward run inside, as batch ``key``'s."""
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
        """Run the forward inside with text layers 0..start-1 not computing; yields how many are skipped.

        Only valid when those layers compute what they computed when batch ``key`` was recorded.
        """
        start = min(start, self.n_layers) if self.has(key) else 0
        if start <= 0:
            yield 0
            return
        recorded = self._outputs[key][start - 1]

        # cheaper than replaying each: what the layers before b-1 return (and what the model adds to
        # it, e.g. Qwen3-VL's deepstack features) only feeds layer b-1, which ignores its input
        def pass_through(*args, **kwargs):
            return _hidden_states(args, kwargs)

        def replay(*args, **kwargs):
            hidden = _hidden_states(args, kwargs)
            if hidden.shape != recorded.shape:
                raise VlmsensError(f"text layer {start - 1}'s recorded output {tuple(recorded.shape)} does not fit "
                                   f"the batch {tuple(hidden.shape)}: recorded for another batch")
            return recorded.to(hidden.device, hidden.dtype, non_blocking=True)

        patched = list(self.layers)[:start]
        saved = [layer.__dict__.get("forward") for layer in patched]
        try:
            for i, layer in enumerate(patched):
                layer.forward = replay if i == start - 1 else pass_through
            yield start
        finally:
            for layer, forward in zip(patched, saved, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
