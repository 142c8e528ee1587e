"""A module's full state (parameters AND buffers) as one flat tensor per dtype.

Packing once into preallocated buffers means an exchange costs one copy and one collective per
dtype, whatever the number of parameter tensors. `bind` goes further for teachers: it makes the
module's tensors *views* into the flat buffers, so receiving into the buffers updates the teacher
with no copy at all.

For a sharded module (sharding.py) the state is this worker's shard of every parameter (and the
whole buffers, which FSDP does not shard): a FlatState of a model and one of its teacher on the same
worker have the same layout, so shards travel between the workers of a column like whole states.
Each shard's slot is padded as FSDP pads it (`padded_numel`), so that `bind` can hand the slots to
FSDP as the teacher's shards: a sharded teacher then costs its shard once, not shard + buffer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .sharding import is_dtensor, keep_shards_in, local, padded_numel


def state_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name, tensor, slot elements) for the parameters and buffers in state_dict order (identical
    for two modules of one architecture); this worker's shard of a sharded parameter, whose slot is
    the padded shard. A tensor shared by two modules (an output layer tied to the embedding) appears
    under both names."""
    return [(k, local(v), padded_numel(v)) for k, v in module.state_dict(keep_vars=True).items()]


def _storage_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (a tie): the same view of the same storage."""
    if t.device.type == "meta" or t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class FlatState:
    """Flat buffers, one per dtype, laid out like `module`'s state, each distinct tensor once.

    Tied weights (one Parameter reachable under two names, as Hugging Face ties the output layer
    to the embedding) get one slot: they cross the link once, count once in `nbytes`, and `bind`
    gives both names one Parameter again, so a teacher keeps the tie.
    """

    def __init__(self, module: nn.Module, device: torch.device | str | None = None):
        self.names: list[str] = []  # one per distinct tensor: its first name in state_dict order
        self.slots: dict[str, int] = {}  # every state_dict name -> its tensor's index in `names`
        # (dtype, offset, shape, slot elements >= shape.numel(), channels_last)
        self.layout: list[tuple[torch.dtype, int, torch.Size, int, bool]] = []
        sizes: dict[torch.dtype, int] = {}
        seen: dict[tuple, int] = {}
        for name, t, slot in state_tensors(module):
            key = _storage_key(t)
            if key in seen:  # a second name of a tensor already laid out
                self.slots[name] = seen[key]
                continue
            seen[key] = self.slots[name] = len(self.names)
            offset = sizes.get(t.dtype, 0)
            self.names.append(name)
            channels_last = (t.dim() == 4 and not t.is_contiguous()
                             and t.is_contiguous(memory_format=torch.channels_last))
            self.layout.append((t.dtype, offset, t.shape, slot, channels_last))
            sizes[t.dtype] = offset + slot
        first = local(next(iter(module.state_dict().values()), torch.empty(0)))
        device = device if device is not None else first.device
        self.buffers = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}
        if first.is_pinned():  # FSDP's offloaded shards are pinned; the slots that hold them must be too
            self.buffers = {dt: b.pin_memory() for dt, b in self.buffers.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values()), torch.empty(0)).device

    def channels_last(self) -> list[bool]:
        """Per tensor, whether its flat copy is in channels_last order (the module's layout)."""
        return [cl for *_, cl in self.layout]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def views(self) -> list[torch.Tensor]:
        """One view per tensor, in the tensor's own memory format (channels_last weights stay so)."""
        out = []
        for dt, off, shape, _, channels_last in self.layout:
            flat = self.buffers[dt][off:off + shape.numel()]
            out.append(flat.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
                       if channels_last else flat.view(shape))
        return out

    def _tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """`module`'s distinct tensors, in the order of `names`."""
        state = module.state_dict(keep_vars=True)
        return [local(state[name]) for name in self.names]

    def pack(self, module: nn.Module) -> None:
        """Copy `module`'s state into the buffers."""
        with torch.no_grad():
            for view, t in zip(self.views(), self._tensors(module)):
                view.copy_(t)

    def unpack(self, module: nn.Module) -> None:
        """Copy the buffers into `module`'s state."""
        with torch.no_grad():
            for view, t in zip(self.views(), self._tensors(module)):
                t.copy_(view)

    def bind(self, module: nn.Module) -> None:
        """Make `module`'s parameters and buffers views into these buffers (values copied in first);
        the names of one tied tensor get one Parameter, so the tie survives. A sharded module keeps
        its parameters (FSDP owns them) but stores their shards in our slots (`keep_shards_in`)."""
        self.pack(module)
        views = self.views()
        if any(is_dtensor(p) for p in module.parameters()):
            index = {id(v): self.slots[k] for k, v in module.state_dict(keep_vars=True).items()}
            slots = [self.buffers[dt][off:off + n] for dt, off, _, n, _ in self.layout]
            keep_shards_in(module, lambda p: slots[index[id(p)]])
            self._bind_buffers(module, views)
            return
        params: dict[int, nn.Parameter] = {}
        for mod_name, sub in module.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for pname, p in list(sub._parameters.items()):
                if p is not None:
                    i = self.slots[prefix + pname]
                    if i not in params:
                        params[i] = nn.Parameter(views[i], requires_grad=False)
                    sub._parameters[pname] = params[i]
        self._bind_buffers(module, views)

    def _bind_buffers(self, module: nn.Module, views: list[torch.Tensor]) -> None:
        for mod_name, sub in module.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for bname, b in list(sub._buffers.items()):
                if b is not None and prefix + bname in self.slots:
                    sub._buffers[bname] = views[self.slots[prefix + bname]]

    def copy_(self, other: "FlatState") -> None:
        for dt, buf in self.buffers.items():
            buf.copy_(other.buffers[dt])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The buffers by dtype name (a CPU copy, made only by the callers that write a file): what
        exchange files and checkpoints hold."""
        return {str(dt): b.detach().to("cpu", copy=True) for dt, b in self.buffers.items()}

    def shapes(self) -> dict[str, torch.Size]:
        return {str(dt): b.shape for dt, b in self.buffers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for dt, buf in self.buffers.items():
            buf.copy_(state[str(dt)])
