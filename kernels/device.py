"""What a GPU offers the kernels: shared memory per program, SMs, and the architecture's features.

The conv kernels' configs are pruned to what the device at hand can launch, and the generator's
choice between Triton and PyTorch skips timing where the architecture has no tensor-core path.
Both ask `of(device)`; the compile report asks `for_arch(arch)` to stand in for a GPU it has not.

    feature          from      used for
    cp.async         sm_80     pipelined global->shared copies (num_stages > 1 pays off)
    bf16 / TF32 MMA  sm_80     tensor cores for bf16 and fp32 (TF32) dots
    fp16 MMA         sm_75     tensor cores for fp16 dots (mma.sync on Turing)
    wgmma            sm_90     Hopper's warpgroup MMA
"""

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    arch: int  # compute capability as major * 10 + minor: 75, 80, 86, 89, 90, 120
    sms: int
    shared_bytes: int  # the most shared memory one program may use (the opt-in maximum)

    @property
    def cp_async(self) -> bool:
        return self.arch >= 80

    @property
    def wgmma(self) -> bool:
        return self.arch == 90

    def tensor_cores(self, dtype: torch.dtype) -> bool:
        """Whether a Triton dot in `dtype` runs on tensor cores here (fp32 through TF32)."""
        return self.arch >= (75 if dtype == torch.float16 else 80)


# Stand-ins for the compile report: one common card per architecture, with its opt-in shared
# memory per block (CUDA programming guide, "Compute Capabilities") and SM count.
KNOWN = {
    75: Device("sm_75 (T4)", 75, 40, 65_536),
    80: Device("sm_80 (A100)", 80, 108, 166_912),
    86: Device("sm_86 (RTX 3090)", 86, 82, 101_376),
    89: Device("sm_89 (RTX 4090)", 89, 128, 101_376),
    90: Device("sm_90 (H100)", 90, 132, 232_448),
    120: Device("sm_120 (RTX 5090)", 120, 170, 101_376),
}


def for_arch(arch: int) -> Device:
    """The stand-in device of an architecture (KNOWN), for reports made without that GPU."""
    if arch not in KNOWN:
        raise ValueError(f"unknown architecture sm_{arch}: known are {', '.join(f'sm_{a}' for a in KNOWN)}")
    return KNOWN[arch]


@functools.cache
def _cuda(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    if not shared:  # older torch: ask Triton's driver
        import triton

        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Device(props.name, props.major * 10 + props.minor, props.multi_processor_count, int(shared))


def of(device: torch.device) -> Device:
    """The CUDA device a tensor lives on, read once per process and device."""
    if device.type != "cuda":
        raise ValueError(f"kernels.device.of: {device} is not a CUDA device")
    return _cuda(device.index if device.index is not None else torch.cuda.current_device())
