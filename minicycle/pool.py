"""The 50-image history of generated images (Shrivastava et al. 2017), as the CycleGAN paper uses
it: discriminators see a mix of current and past fakes, which damps oscillation.
"""

import random

import torch


class ImagePool:
    """Per image, as the official loop: until the pool is full, store the image and return it. After that,
    with probability 1/2 return a stored image and put the new one in its place; otherwise return the new
    image. pool_size 0 disables the pool."""

    def __init__(self, pool_size: int, seed: int = 0):
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())  # a copy: the batch it came from is freed
                out.append(image)
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.pool_size - 1)
                out.append(self.images[i])
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [t.cpu() for t in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.images = [t.to(device) for t in state["images"]]
        # random.Random state is (version, tuple_of_ints, gauss_next); a checkpoint may turn tuples into lists.
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
