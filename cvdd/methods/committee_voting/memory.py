"""How many synthetic images recover optimises at once when ``method.recover.wave_images`` is unset, and how many it
stacks into one group when ``method.recover.group_images`` is.

The tensors autograd saves for the members' passes over a wave's images are nearly all of a wave's
memory. Each pass frees its graph once its gradient is taken (:mod:`cvdd.committee.passes`), so only the
passes in flight hold theirs; the estimate counts every member's pass over every image of the wave
alive together, an upper bound. :func:`member_bytes_per_image` measures them for one image through
one member, exactly as recover runs it (the member's numerics, the BN-statistics hook), by counting
the storage autograd saves at two batch sizes: the difference is per image and excludes what does not
grow with the batch (weights, their bf16 copies). A unit's image passes through each of the unit's
members, and also costs its fp32 state (the image, its gradient, Adam's two moments, the augmented copy and the
augmentation's saved input: :data:`STATE_COPIES` copies).

The wave takes :data:`BUDGET_FRACTION` of the free memory, divided by the worst unit's cost per
image times :data:`HEADROOM` (the backward's gradient buffers, convolution workspaces and allocator
fragmentation). Waves change memory and speed, never results (units are computed in fixed groups),
so a machine-dependent choice is safe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from cvdd.committee.committee import Committee

BUDGET_FRACTION = 0.8  # of the free memory at the start of recover
HEADROOM = 1.5  # peak over the saved tensors: gradient buffers during backward, workspaces, fragmentation
STATE_COPIES = 6  # fp32 copies of an image: parameter, gradient, Adam's two moments, augmented, saved input


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` builds its graph.

    Each storage seen is held until the count is done: a saved tensor freed mid-run would otherwise let the
    allocator hand its address to a later one, and the two would count once (how often depends on the heap)."""
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storage.nbytes() for storage in seen.values())


def member_bytes_per_image(committee: Committee, member: str, image_shape: Sequence[int], device) -> float:
    """Saved-for-backward bytes one image adds to ``member``'s recover forward pass (CE and BN loss)."""

    def probe(batch: int) -> int:
        images = torch.randn(batch, *image_shape, device=device, requires_grad=True)
        labels = torch.zeros(batch, dtype=torch.long, device=device)

        def run() -> None:
            ce, bn = committee.losses(member, images, labels, units=1)
            (ce + bn).sum()

        return saved_bytes(run)

    return max(0.0, (probe(4) - probe(2)) / 2)


def image_state_bytes(image_shape: Sequence[int]) -> int:
    """fp32 bytes one synthetic image keeps alive besides the members' activations."""
    return STATE_COPIES * 4 * math.prod(image_shape)


def wave_bytes_per_image(member_bytes: dict[str, float], unit_members: Iterable[Sequence[str]], state: int) -> float:
    """The worst unit's bytes per image: its members' activations plus the image's own state."""
    return max(sum(member_bytes[m] for m in members) for members in unit_members) + state


def free_bytes(device: torch.device, processes_per_node: int = 1) -> int | None:
    """Free memory for this process: the CUDA device's free memory, or on CPU the node's available memory
    (``MemAvailable``) shared by its processes; ``None`` when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // max(1, processes_per_node)
    except OSError:
        return None
    return None


GROUP_MEMORY_CAP = 23 * 2**30  # a 24 GB card's free memory: groups never need more (bigger devices take more per wave)


def auto_group_images(bytes_per_image: float, free: int | None, unit_images: int) -> int:
    """Images per group for ``method.recover.group_images=null``: the largest power of two of
    ``unit_images``-image units whose images fit :data:`BUDGET_FRACTION` of ``free`` at ``HEADROOM`` ×
    ``bytes_per_image``, counting ``free`` as at most :data:`GROUP_MEMORY_CAP` (unknown: the cap); at least one unit.
    Powers of two keep the choice the same across machines with similar memory; a group's size changes results by
    float rounding only."""
    budget = BUDGET_FRACTION * min(GROUP_MEMORY_CAP if free is None else free, GROUP_MEMORY_CAP)
    units = int(budget // (HEADROOM * bytes_per_image * unit_images))
    return unit_images * (1 << (units.bit_length() - 1) if units >= 1 else 1)


def auto_wave_images(bytes_per_image: float, free: int, smallest: int, largest: int) -> int:
    """Images per wave that fit ``BUDGET_FRACTION`` of ``free`` at ``HEADROOM`` × ``bytes_per_image``, at least
    ``smallest`` (one group is optimised at once) and at most ``largest`` (all the work)."""
    fits = int(BUDGET_FRACTION * free // (HEADROOM * bytes_per_image))
    return max(smallest, min(largest, fits))
