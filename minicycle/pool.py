"""The 50-image history of generated images (Shrivastava et al. 2017), as the CycleGAN paper uses
it: discriminators see a mix of current and past fakes, which damps oscillation.

Each sample's fate depends only on how full the pool is and on the pool's own RNG, never on the
image, so it can be drawn on the host before the images exist (ImagePool.draw). ImagePool keeps
the images in a list (any sizes); DevicePool keeps the same pool in one preallocated device tensor
and moves images with index ops only, so that a step using it can be captured in a CUDA graph.
"""

import random

import torch

Fate = tuple[int | None, int | None]  # (slot returned instead of the sample, slot the sample is stored in)


class ImagePool:
    """Per sample: until the pool is full, store the image and return it. After that, with
    probability 1/2 return a stored image and put the new one in its place; otherwise return the
    new image. pool_size 0 disables the pool."""

    def __init__(self, pool_size: int, seed: int = 0):
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def draw(self, n: int) -> list[Fate]:
        """The fates of the next n samples, consuming the RNG exactly as the official per-image loop."""
        fates: list[Fate] = []
        count = len(self.images)
        for _ in range(n):
            if count < self.pool_size:
                fates.append((None, count))
                count += 1
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.pool_size - 1)
                fates.append((i, i))
            else:
                fates.append((None, None))
        return fates

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images
        out = []
        for image, (ret, store) in zip(images.detach(), self.draw(len(images))):
            image = image.unsqueeze(0)
            out.append(image if ret is None else self.images[ret].clone())
            if store == len(self.images):
                self.images.append(image.clone())
            elif store is not None:
                self.images[store] = image.clone()
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [t.cpu() for t in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.images = [t.to(device) for t in state["images"]]
        self.rng.setstate(_as_rng_state(state["rng"]))


class DevicePool:
    """An ImagePool whose images live in one device tensor of pool_size + batch rows (the extra
    rows take the writes a batch does not need, so every batch writes exactly batch rows).

    plan(n) draws on the host and turns the fates into row indices; apply(images, plan) gathers
    the pooled images and writes the new ones with index ops of fixed shapes: no host sync and no
    allocation that depends on the draws. The ImagePool's list holds views of the buffer's rows,
    so its state_dict (and, after a fallback, its query) keep working unchanged.
    """

    def __init__(self, pool: ImagePool, batch: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.pool, self.batch = pool, batch
        self.buffer = torch.zeros((pool.pool_size + batch, *shape), dtype=dtype, device=device)
        for i, image in enumerate(pool.images):
            self.buffer[i].copy_(image[0])
        pool.images = [self.buffer[i:i + 1] for i in range(len(pool.images))]

    def plan(self, n: int) -> list[int]:
        """5n row indices: per sample the pool row and the batch row it may read, whether it reads
        the pool; then n (pool row, batch row) writes. A sample may return an image stored earlier
        in the same batch: that one is read from the batch, since the pool is read before it is written."""
        if self.pool.pool_size == 0:
            return [0] * 5 * n
        if n > self.batch:
            raise ValueError(f"DevicePool sized for batches of {self.batch}, got {n}")
        spare = self.pool.pool_size
        holds: dict[int, int] = {}  # slot -> batch row stored there by this batch
        read_pool, read_batch, use_pool = [], [], []
        for j, (ret, store) in enumerate(self.pool.draw(n)):
            from_pool = ret is not None and ret not in holds
            read_pool.append(ret if from_pool else spare)
            read_batch.append(j if ret is None else holds.get(ret, 0))
            use_pool.append(int(from_pool))
            if store is not None:
                holds[store] = j
                if store == len(self.pool.images):
                    self.pool.images.append(self.buffer[store:store + 1])
        writes = sorted(holds.items()) + [(spare + k, 0) for k in range(n - len(holds))]
        return read_pool + read_batch + use_pool + [w for w, _ in writes] + [b for _, b in writes]

    def apply(self, images: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """The pooled batch for D, and the pool updated in place, as planned."""
        if self.pool.pool_size == 0:
            return images
        images = images.detach()
        n = images.shape[0]
        read_pool, read_batch, use_pool, write_row, write_src = plan.view(5, n)
        mask = use_pool.view(n, *[1] * (images.dim() - 1)).bool()
        out = torch.where(mask, self.buffer.index_select(0, read_pool), images.index_select(0, read_batch))
        self.buffer.index_copy_(0, write_row, images.index_select(0, write_src))
        return out


def _as_rng_state(state) -> tuple:
    # random.Random state is (version, tuple_of_ints, gauss_next); a checkpoint may turn tuples into lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
