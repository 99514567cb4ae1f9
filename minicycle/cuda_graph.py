"""The whole CycleGAN training iteration as one CUDA graph (train.py --cuda_graph).

At batch 1 an iteration is thousands of kernel launches, each costing host time in Python, the dispatcher
and Triton's launcher; captured once and replayed, it is one launch. Capture records kernels with their
arguments and addresses, so the step must not depend on the host while it runs. GraphedStep adapts the
model to that and runs the paper's step, CycleGAN.step, unchanged:

- inputs are copied into static tensors, and the model's image pools are swapped for DevicePools: the same
  pools in device tensors, whose random choices are drawn on the host before the step, from the same RNG
  stream, and applied in it with index ops;
- Adam runs in its capturable form (capturable_adam), and autocast keeps no cast cache (no_cast_cache);
  gradients set to None inside the capture are allocated by backward in the graph's memory pool;
- each step's 8 losses go to a row of a device buffer, read back in one copy by read();
- learning rates are Python floats in the captured Adam kernels: when the scheduler changes one, the step
  is captured again.

The first `warmup` steps run eagerly on a side stream (the autotuners and --kernels auto time kernels then,
which capture forbids), the next is captured, and the rest replay. A short batch runs the same step eagerly;
images of another size switch to the normal path for the rest of the run. Without a graph (off CUDA, and in
the tests) every step runs eagerly: this "eager twin" gives CycleGAN.optimize's weights bit for bit in fp32.
On CUDA the twin, like the graph, uses capturable Adam, whose rounding differs in the last bits.
"""

import contextlib
import sys

import torch

from minicycle.model import LOSS_NAMES, CycleGAN
from minicycle.pool import ImagePool


class GraphedStep:
    """step(real_A, real_B) trains one iteration; read() returns the losses of the steps since the last read."""

    def __init__(self, model: CycleGAN, batch_size: int, graph: bool, warmup: int = 3, rows: int = 256):
        if graph and model.device.type != "cuda":
            raise ValueError(f"--cuda_graph: a CUDA graph needs a CUDA device, not {model.device}")
        if model.scaler.is_enabled():
            raise ValueError("an fp16 gradient scaler needs the host every step (inf checks); use bf16")
        self.model, self.batch_size, self.use_graph, self.warmup, self.rows = model, batch_size, graph, warmup, rows
        if model.device.type == "cuda":  # the eager twin too, so that it computes what the graph does
            for optimizer in model.optimizers():
                capturable_adam(optimizer)
        self.shapes: tuple[torch.Size, torch.Size] | None = None  # per-sample shapes of A and B, from the first step
        self.pools: tuple[ImagePool, ImagePool] = (model.fake_B_pool, model.fake_A_pool)  # the model's own
        self.static: dict[str, torch.Tensor] = {}  # inputs and loss rows
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lrs: list[float] = []  # the learning rates baked into the captured Adam steps
        self.steps = 0  # full-batch steps taken
        self.pending = 0  # steps whose losses are still in the device buffer
        self.ready: list[dict[str, float]] = []  # losses read back (or from the normal path), not yet handed out
        self.normal_path = False  # after images of another size: CycleGAN.optimize for the rest of the run
        self.said: set[str] = set()

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        if self.shapes is None:
            self._adopt_pools(real_A, real_B)
        if self.normal_path or (real_A.shape[1:], real_B.shape[1:]) != self.shapes:
            return self._normal_step(real_A, real_B)
        if self.pending == self.rows:
            self._read_device()
        m, s = self.model, self.static
        m.fake_B_pool.draw(len(real_A))
        m.fake_A_pool.draw(len(real_B))
        s["row"].fill_(self.pending)
        self.pending += 1
        if len(real_A) != self.batch_size or len(real_B) != self.batch_size:
            self._say("batch", f"a batch of {len(real_A)}, not {self.batch_size}: such steps run without the graph")
            return self._body(m.place(real_A), m.place(real_B))
        if "A" not in s:  # the static inputs, from the first full batch
            s["A"], s["B"] = (torch.empty_like(x, device=m.device, memory_format=m.memory_format)
                              for x in (real_A, real_B))
        s["A"].copy_(real_A, non_blocking=True)
        s["B"].copy_(real_B, non_blocking=True)
        self.steps += 1
        if not self.use_graph:
            self._body(s["A"], s["B"])
        elif self.steps <= self.warmup:
            side = torch.cuda.Stream(m.device)
            side.wait_stream(torch.cuda.current_stream(m.device))
            with torch.cuda.stream(side):
                self._body(s["A"], s["B"])
            torch.cuda.current_stream(m.device).wait_stream(side)
        else:
            lrs = [g["lr"] for opt in m.optimizers() for g in opt.param_groups]
            if self.graph is None or lrs != self.graph_lrs:
                self._capture(lrs)
            self.graph.replay()

    def read(self) -> list[dict[str, float]]:
        """The losses of every step since the last read, in order (one device sync)."""
        self._read_device()
        out, self.ready = self.ready, []
        return out

    # ---------------------------------------------------------------------------------------------
    def _adopt_pools(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        """At the first step (after any resume has loaded the pools): the model's pools become DevicePools."""
        m = self.model
        self.shapes = (real_A.shape[1:], real_B.shape[1:])
        # fake_B = G_A(real_A) has real_A's size and output_nc channels; under autocast, the amp dtype.
        fake_B, fake_A = (m.cfg.output_nc, *real_A.shape[2:]), (m.cfg.input_nc, *real_B.shape[2:])
        pools = ((m.fake_B_pool, fake_B), (m.fake_A_pool, fake_A))
        if any(tuple(t.shape[1:]) != shape for pool, shape in pools for t in pool.images):
            return self._normal_path("the image pools hold images of other sizes (a resumed run with mixed sizes)")
        m.fake_B_pool, m.fake_A_pool = (DevicePool(pool, self.batch_size, shape, m.amp or torch.float32, m.device)
                                        for pool, shape in pools)
        self.static["losses"] = torch.zeros(self.rows, len(LOSS_NAMES), device=m.device)
        self.static["row"] = torch.zeros(1, dtype=torch.int64, device=m.device)  # this step's row of losses

    def _body(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        with no_cast_cache():
            losses = self.model.step(real_A, real_B)
        self.static["losses"].index_copy_(0, self.static["row"], losses[None])

    def _capture(self, lrs: list[float]) -> None:
        self.graph = None  # frees the previous graph's memory pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps making CUDA calls during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body(self.static["A"], self.static["B"])
        self.graph, self.graph_lrs = graph, lrs

    def _read_device(self) -> None:
        if self.pending:
            rows = self.static["losses"][:self.pending].tolist()
            self.ready += [dict(zip(LOSS_NAMES, r)) for r in rows]
            self.pending = 0

    def _normal_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        if not self.normal_path:
            (a, b), (sa, sb) = (real_A.shape[2:], real_B.shape[2:]), (s[1:] for s in self.shapes)
            self._normal_path(f"images of {tuple(a)} and {tuple(b)} after {tuple(sa)} and {tuple(sb)}")
        self._read_device()
        self.ready.append(self.model.optimize(real_A, real_B))

    def _normal_path(self, why: str) -> None:
        self.normal_path, self.graph = True, None
        self.model.fake_B_pool, self.model.fake_A_pool = self.pools  # which hold what the DevicePools stored
        self._say("normal", f"{why}: training on without it (the normal path) for the rest of this run")

    def _say(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            print(f"note: --cuda_graph: {message}", file=sys.stderr)


class DevicePool:
    """An ImagePool kept in one device tensor, with the same query, state_dict and RNG stream, whose query a CUDA
    graph can capture: draw(n), on the host before the step, draws the fates of the next n images as
    ImagePool.query does and writes them as row indices into a small device tensor (the plan); query, in the
    step, moves images with index ops of fixed shapes: no host sync, no allocation that depends on the draws.
    The buffer has pool_size + batch rows: query stages the batch in the extra rows, then reads the n images D
    sees and writes n rows (those the batch does not store write a staged row onto itself). The ImagePool's
    list holds views of the buffer's first rows, so its state_dict (and its own query) keep working."""

    def __init__(self, pool: ImagePool, batch: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.pool, self.batch = pool, batch
        self.buffer = torch.zeros((pool.pool_size + batch, *shape), dtype=dtype, device=device)
        for i, image in enumerate(pool.images):
            self.buffer[i].copy_(image[0])
        pool.images = [self.buffer[i:i + 1] for i in range(len(pool.images))]
        self.plan = torch.zeros(3 * batch, dtype=torch.int64, device=device)

    def state_dict(self) -> dict:
        return self.pool.state_dict()

    def draw(self, n: int) -> None:
        """The plan of the next n images, 3n buffer rows: the row each image D sees is read from (its own
        staged row, or a pool row), then n (row written, row copied there). An image may return one stored
        earlier in the same batch: that one is read from its staged row (the pool is read before it is
        written)."""
        pool, staged = self.pool, self.pool.pool_size  # staged + j: the row of the batch's image j
        if pool.pool_size == 0:
            return
        if n > self.batch:
            raise ValueError(f"DevicePool sized for batches of {self.batch}, got {n}")
        holds: dict[int, int] = {}  # pool row -> the staged row stored there by this batch
        reads = []
        for j in range(n):
            stored = returned = None  # the pool rows image j is stored in and returned from
            if len(pool.images) < pool.pool_size:
                stored = len(pool.images)
                pool.images.append(self.buffer[stored:stored + 1])
            elif pool.rng.uniform(0, 1) > 0.5:
                stored = returned = pool.rng.randint(0, pool.pool_size - 1)
            reads.append(staged + j if returned is None else holds.get(returned, returned))
            if stored is not None:
                holds[stored] = staged + j
        writes = list(holds.items()) + [(staged + k, staged + k) for k in range(n - len(holds))]
        plan = torch.tensor(reads + [row for row, _ in writes] + [source for _, source in writes])
        self.plan[:3 * n].copy_(plan.pin_memory() if self.plan.is_cuda else plan, non_blocking=True)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The images D sees, and the pool updated in place, as drawn."""
        if self.pool.pool_size == 0:
            return images
        n, staged = len(images), self.pool.pool_size
        reads, rows, sources = self.plan[:3 * n].view(3, n)
        self.buffer[staged:staged + n].copy_(images.detach())
        out = self.buffer.index_select(0, reads)
        self.buffer.index_copy_(0, rows, self.buffer.index_select(0, sources))
        return out


def capturable_adam(optimizer: torch.optim.Optimizer) -> None:
    """Adam in its capturable form: step counts on the device and bias corrections as tensor ops, no host
    sync (CUDA only; it rounds differently from the default form in the last bits). Its state_dict keeps
    the default form, so that a checkpoint resumes without --cuda_graph too, and a loaded state takes the
    capturable form again."""
    def capturable_form(optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                if "step" in (state := optimizer.state.get(p, {})):
                    state["step"] = state["step"].to(p.device)

    def default_form(optimizer: torch.optim.Optimizer, state: dict) -> dict:
        for group in state["param_groups"]:  # copies, as is the dict of per-parameter states
            group["capturable"] = False
        state["state"] = {k: v | {"step": v["step"].cpu()} for k, v in state["state"].items()}
        return state

    capturable_form(optimizer)
    optimizer.register_load_state_dict_post_hook(capturable_form)
    optimizer.register_state_dict_post_hook(default_form)


@contextlib.contextmanager
def no_cast_cache():
    """Autocast without its cache of cast weights, which capture forbids (CycleGAN.step's autocast takes
    torch's setting). A weight used several times in one autocast region is then cast once per use, so
    under bf16 its gradient is summed in fp32 over the uses rather than in bf16: the last bits differ
    (fp32 is unaffected)."""
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cache)
