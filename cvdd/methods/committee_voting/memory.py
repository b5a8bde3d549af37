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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from cvdd.committee.committee import Committee
from cvdd.runtime.errors import UserError

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
    """Free memory for this process: the CUDA device's free memory, or on CPU the least of the node's available
    memory (``MemAvailable``), what the process's cgroup still allows (``memory.max``, a container's or a job's
    limit) and what its address-space limit still allows (``ulimit -v``), the first two shared by the node's
    processes; ``None`` when none can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    shared = [b for b in (meminfo_available(), cgroup_headroom()) if b is not None]
    limits = [b // max(1, processes_per_node) for b in shared]
    own = address_space_headroom()
    if own is not None:
        limits.append(own)
    return min(limits) if limits else None


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """``memory.max − memory.current`` of this process's cgroup (v2; v1's ``memory.limit_in_bytes −
    memory.usage_in_bytes``); ``None`` without a limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    relative = next((line.split(":", 2)[2].lstrip("/") for line in lines if line.startswith("0::")), "")
    candidates = [
        (root / relative / "memory.max", root / relative / "memory.current"),
        (root / "memory.max", root / "memory.current"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),
    ]
    for limit_file, usage_file in candidates:
        try:
            limit, usage = limit_file.read_text().strip(), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 says "no limit" with a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def address_space_headroom(status: Path = Path("/proc/self/status")) -> int | None:
    """``RLIMIT_AS`` (``ulimit -v``) minus this process's virtual size; ``None`` without a limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        lines = status.read_text().splitlines()
        size = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, soft - size)


class RecoverOutOfMemoryError(UserError, MemoryError):
    """Recover's images and the members' activations did not fit."""


@contextmanager
def named_memory_keys() -> Iterator[None]:
    """An allocation failure inside recover becomes an error that names the settings that bound its memory."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        text = str(err)
        if (
            isinstance(err, RuntimeError)
            and not isinstance(err, torch.OutOfMemoryError)
            and not any(sign in text for sign in ("can't allocate memory", "out of memory", "not enough memory"))
        ):
            raise
        raise RecoverOutOfMemoryError(
            f"recover ran out of memory ({text.splitlines()[0] if text else type(err).__name__}); lower "
            "method.recover.wave_images (images optimised at once; results do not change) or "
            "method.recover.group_images (images stacked per group; results change by float rounding only)"
        ) from err


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
