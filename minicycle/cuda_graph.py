"""The whole CycleGAN training iteration as one CUDA graph (train.py --cuda_graph).

At batch 1 an iteration is thousands of kernel launches (6 generator forwards, 6 discriminator
forwards, both backwards, two Adam steps), and each launch costs host time in Python, the
dispatcher and Triton's launcher. Captured once and replayed, the iteration is one launch.
Capture records kernels with their arguments and addresses, so the step must not depend on the
host while it runs:

- inputs are copied into static tensors, and the image pools live in device tensors
  (pool.DevicePool) whose random choices are drawn on the host before the step, from the same
  RNG stream as the normal path, and passed in as a small index tensor (the plan);
- Adam runs in its capturable form, autocast keeps no cast cache (CycleGAN.step(graph_safe=True));
  gradients set to None inside the capture are allocated by backward in the graph's memory pool;
- each step's 8 losses go to a row of a device buffer, read back in one copy by read() (train.py
  reads once per --print_freq images and before every save, so a NaN never reaches a checkpoint);
- learning rates are Python floats in the captured Adam kernels: when the scheduler changes one
  (once an epoch at most), the step is captured again. Checkpoints and schedulers stay as they are.

The first `warmup` steps run eagerly on a side stream (Triton's autotuner, cuDNN's benchmark and
--kernels auto's choice between them, kernels/choice.py, time kernels then, which capture forbids;
the capture looks the choices up), the next is captured, and the rest replay. A batch
of another size (a short last batch) runs the same step eagerly; images of another size switch
to the normal path for the rest of the run. Without a graph (off CUDA, and in the tests) every
step runs eagerly: this "eager twin" gives CycleGAN.optimize's weights bit for bit in fp32 (under
bf16 autocast the last bits differ, see CycleGAN.step). On CUDA the twin, like the graph, uses
capturable Adam, whose rounding differs from the default Adam's in the last bits.
"""

import sys

import torch

from minicycle.model import LOSS_NAMES, CycleGAN
from minicycle.pool import DevicePool


class GraphedStep:
    """step(real_A, real_B) trains one iteration; read() returns the losses of the steps since the last read."""

    def __init__(self, model: CycleGAN, batch_size: int, graph: bool, warmup: int = 3, rows: int = 256):
        if graph and model.device.type != "cuda":
            raise ValueError(f"--cuda_graph: a CUDA graph needs a CUDA device, not {model.device}")
        if model.scaler.is_enabled():
            raise ValueError("an fp16 gradient scaler needs the host every step (inf checks); use bf16")
        self.model, self.batch_size, self.use_graph, self.warmup, self.rows = model, batch_size, graph, warmup, rows
        if model.device.type == "cuda":  # the eager twin too, so that it computes what the graph does
            model.set_capturable(True)
        self.shapes: tuple[torch.Size, torch.Size] | None = None  # per-sample shapes of A and B, from the first step
        self.static: dict[str, torch.Tensor] = {}  # inputs, plan and loss rows, from the first full batch
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lrs: list[float] = []  # the learning rates baked into the captured Adam steps
        self.steps = 0  # full-batch steps taken
        self.pending = 0  # steps whose losses are still in the device buffer
        self.ready: list[dict[str, float]] = []  # losses read back (or from the normal path), not yet handed out
        self.normal_path = False  # after images of another size: CycleGAN.optimize for the rest of the run
        self.said: set[str] = set()

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        if self.shapes is None:
            self._setup_pools(real_A, real_B)
        if self.normal_path or (real_A.shape[1:], real_B.shape[1:]) != self.shapes:
            return self._normal_step(real_A, real_B)
        if self.pending == self.rows:
            self._read_device()
        device = self.model.device
        plan = self.pool_B.plan(len(real_A)) + self.pool_A.plan(len(real_B)) + [self.pending]
        self.pending += 1
        if len(real_A) != self.batch_size or len(real_B) != self.batch_size:
            self._say("batch", f"a batch of {len(real_A)}, not {self.batch_size}: such steps run without the graph")
            plan_t = torch.tensor(plan, dtype=torch.int64, device=device)
            return self._body(self.model.place(real_A), self.model.place(real_B), plan_t)
        s = self.static if "A" in self.static else self._setup_static(real_A, real_B, len(plan))
        s["A"].copy_(real_A, non_blocking=True)
        s["B"].copy_(real_B, non_blocking=True)
        plan_host = torch.tensor(plan, dtype=torch.int64)
        s["plan"].copy_(plan_host.pin_memory() if device.type == "cuda" else plan_host, non_blocking=True)
        self.steps += 1
        if not self.use_graph:
            self._body(s["A"], s["B"], s["plan"])
        elif self.steps <= self.warmup:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._body(s["A"], s["B"], s["plan"])
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            lrs = [g["lr"] for opt in (self.model.optimizer_G, self.model.optimizer_D) for g in opt.param_groups]
            if self.graph is None or lrs != self.graph_lrs:
                self._capture(lrs)
            self.graph.replay()

    def read(self) -> list[dict[str, float]]:
        """The losses of every step since the last read, in order (one device sync)."""
        self._read_device()
        out, self.ready = self.ready, []
        return out

    # ---------------------------------------------------------------------------------------------
    def _setup_pools(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        m = self.model
        self.shapes = (real_A.shape[1:], real_B.shape[1:])
        # fake_B = G_A(real_A) has real_A's size and output_nc channels; under autocast, the amp dtype.
        fake_B, fake_A = (m.cfg.output_nc, *real_A.shape[2:]), (m.cfg.input_nc, *real_B.shape[2:])
        pools = ((m.fake_B_pool, fake_B), (m.fake_A_pool, fake_A))
        if any(tuple(t.shape[1:]) != shape for pool, shape in pools for t in pool.images):
            return self._normal_path("the image pools hold images of other sizes (a resumed run with mixed sizes)")
        self.pool_B, self.pool_A = (DevicePool(pool, self.batch_size, shape, m.amp or torch.float32, m.device)
                                    for pool, shape in pools)
        self.static["losses"] = torch.zeros(self.rows, len(LOSS_NAMES), device=m.device)

    def _setup_static(self, real_A: torch.Tensor, real_B: torch.Tensor, plan_size: int) -> dict[str, torch.Tensor]:
        device = self.model.device
        fmt = self.model.memory_format
        self.static |= {"A": torch.empty_like(real_A, device=device, memory_format=fmt),
                        "B": torch.empty_like(real_B, device=device, memory_format=fmt),
                        "plan": torch.empty(plan_size, dtype=torch.int64, device=device)}
        return self.static

    def _body(self, real_A: torch.Tensor, real_B: torch.Tensor, plan: torch.Tensor) -> None:
        n_A, n_B = len(real_A), len(real_B)

        def pools(fake_B: torch.Tensor, fake_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fmt = self.model.memory_format  # as CycleGAN's own pools hand them to D
            return (self.pool_B.apply(fake_B, plan[:5 * n_A]).contiguous(memory_format=fmt),
                    self.pool_A.apply(fake_A, plan[5 * n_A:5 * (n_A + n_B)]).contiguous(memory_format=fmt))

        losses = self.model.step(real_A, real_B, pools, graph_safe=True)
        self.static["losses"].index_copy_(0, plan[-1:], losses[None])

    def _capture(self, lrs: list[float]) -> None:
        self.graph = None  # frees the previous graph's memory pool
        graph = torch.cuda.CUDAGraph()
        s = self.static
        # thread_local: the DataLoader's pin-memory thread keeps making CUDA calls during the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body(s["A"], s["B"], s["plan"])
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
        self._say("normal", f"{why}: training on without it (the normal path) for the rest of this run")

    def _say(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            print(f"note: --cuda_graph: {message}", file=sys.stderr)
