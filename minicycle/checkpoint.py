"""Checkpoint files: atomic writes, safe loads, official-key compatibility, a readable diagnosis
when a generator file does not fit the flags, and a training run's folder of checkpoints."""

import io
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from kernels.runtime import write_atomic
from minicycle.distributed import Dist, check_same_weights

if TYPE_CHECKING:
    from minicycle.model import CycleGAN

STATE_FORMAT = "minicycle-train-state/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message is one line for the user."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save into memory, then write_atomic: `path` holds the old file or the new one, never half of one.

    torch.save never writes to the file itself: a Ctrl-C inside torch.save leaves its zip writer alive in the
    traceback, and when it is collected its C++ destructor writes the end of the archive into what it was given;
    into a closed file, that is an uncatchable "write to closed file" and SIGABRT. A buffer lives as long as the
    writer. The cost: one copy of the file in memory (about 0.42 GB for the paper's training state)."""
    data = io.BytesIO()
    try:
        torch.save(obj, data)
    except OSError as e:  # named as an error writing the file would be
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    write_atomic(path, data.getbuffer())


def caused_by(e: BaseException, kind: type) -> bool:
    """Whether `e` or any exception in its cause/context chain is a `kind`."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def load_file(path: str | Path, map_location="cpu"):
    """torch.load with weights_only=True (no pickled code runs); any failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason[:200]}") from e


def clean_state_dict(state: dict, net: nn.Module) -> dict:
    """Make an official (or wrapped) state_dict loadable into `net`: drop `module.`/`_orig_mod.`
    prefixes and the stale InstanceNorm running_mean/running_var/num_batches_tracked entries that
    checkpoints from PyTorch < 0.4 carry (our InstanceNorm, like the official one, has no buffers)."""
    if not isinstance(state, dict):
        raise CheckpointError("not a state_dict (expected a dict of tensors)")
    own = net.state_dict()
    out = {}
    for key, value in state.items():
        if key == "_metadata":
            continue
        key = re.sub(r"^(module\.|_orig_mod\.)+", "", key)
        key = key.replace("._orig_mod.", ".").replace(".module.", ".")
        if key not in own and key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        out[key] = value
    return out


def describe_generator(state: dict) -> dict:
    """Guess the generator flags that produced a state_dict from its keys and shapes."""
    keys = set(state)
    info: dict = {}
    if "model.1.weight" in keys and any(".conv_block." in k for k in keys):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
        info["netG"] = {9: "resnet_9blocks", 6: "resnet_6blocks"}.get(len(blocks), f"resnet with {len(blocks)} blocks")
        w = state["model.1.weight"]
        info["ngf"], info["input_nc"] = int(w.shape[0]), int(w.shape[1])
        last = max(int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.weight", k)))
        info["output_nc"] = int(state[f"model.{last}.weight"].shape[0])
        info["dropout"] = any(k.endswith(".conv_block.6.weight") and state[k].dim() == 4 for k in keys)
    elif "model.model.0.weight" in keys:
        depth = sum(1 for k, v in state.items() if k.endswith("weight") and v.dim() == 4) // 2  # down+up conv per level
        info["netG"] = {8: "unet_256", 7: "unet_128"}.get(depth, f"unet with {depth} downsamplings")
        w = state["model.model.0.weight"]
        info["ngf"], info["input_nc"] = int(w.shape[0]), int(w.shape[1])
        info["output_nc"] = int(state["model.model.3.weight"].shape[1]) if "model.model.3.weight" in keys else None
    if info:  # BatchNorm has affine (1-D) weights; InstanceNorm has none, though files from PyTorch < 0.4 carry
        # stale running_mean/var for it, so running stats alone do not tell the two apart.
        info["norm"] = "batch" if any(k.endswith(".weight") and v.dim() == 1 for k, v in state.items()) else "instance"
    return info


def flags_for(info: dict) -> str:
    """The command-line flags that would build the generator described by `info`."""
    if not info:
        return ""
    parts = [f"--netG {info['netG']}", f"--ngf {info['ngf']}", f"--norm {info['norm']}"]
    if info.get("input_nc") not in (None, 3):
        parts.append(f"--input_nc {info['input_nc']}")
    if info.get("output_nc") not in (None, 3):
        parts.append(f"--output_nc {info['output_nc']}")
    if info.get("netG", "").startswith("resnet"):
        parts.append("with dropout (without --no_dropout)" if info["dropout"] else "--no_dropout")
    return " ".join(parts)


def load_into(net: nn.Module, path: str | Path, expected_flags: str = "", map_location="cpu") -> None:
    """Strictly load the state_dict in `path` into `net`; a mismatch names the file and the flags
    the file was most likely trained with."""
    state = load_file(path, map_location)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = clean_state_dict(state, net)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        guess = flags_for(describe_generator(state))
        hint = f"; the file looks like {guess}" if guess else ""
        first = str(e).splitlines()[0]
        if not guess:
            missing = [k for k in net.state_dict() if k not in state][:3]
            extra = [k for k in state if k not in net.state_dict()][:3]
            first = f"missing keys {missing}, unexpected keys {extra}" if (missing or extra) else first
        built = f" built with {expected_flags}" if expected_flags else ""
        raise CheckpointError(f"{path}: does not fit the network{built}{hint} ({first[:160]})") from None


class Run:
    """Counters and loss history that, with the model's state and the RNGs, make a resume exact."""

    def __init__(self, epoch: int, seed: int):
        self.epoch = epoch  # current epoch (1-based)
        self.epoch_keys = 0  # samples of this epoch's plan already consumed
        self.steps = 0  # optimizer iterations in the whole run
        self.images = 0  # images seen in the whole run (official counters use images)
        self.seed = seed
        self.history: list[tuple[float, dict[str, float]]] = []  # (fractional epoch, mean losses) per log line
        self.saved_steps = -1  # steps at the last save, so that a stop right after one does not save twice

    def state(self) -> dict:
        return {"epoch": self.epoch, "epoch_keys": self.epoch_keys, "steps": self.steps, "images": self.images,
                "seed": self.seed, "history": self.history}


class RunCheckpoints:
    """checkpoints_dir/name: latest_state.pth, the whole training state for an exact resume (the one before it
    kept as latest_state.prev.pth), and each net's plain state_dict with the official key names,
    latest_net_{G_A,G_B,D_A,D_B}.pth and <epoch>_net_*.pth."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.state_path = folder / "latest_state.pth"

    def prepare(self) -> None:
        """Create the folder, check that it can be written, and remove what a killed save left."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write_test.{os.getpid()}"  # one per process: ranks probe at the same time
            probe.write_text("ok")
            probe.unlink()
            # Temp files of a save cut short by kill -9 or a power cut (a clean failure removes its own).
            # No save can be under way yet: the first one waits for the first step, which waits for every rank.
            for leftover in self.dir.glob(".*.pth.*.tmp"):
                leftover.unlink(missing_ok=True)
        except OSError as e:
            raise CheckpointError(f"--checkpoints_dir: cannot write to {self.dir} ({e.strerror or e})") from None

    def save(self, model: "CycleGAN", run: Run, *, options: dict, dist: Dist, log_bytes: int,
             epoch_label: str | None = None) -> None:
        """The training state, then latest_net_*.pth (and <epoch_label>_net_*.pth). Under torchrun every rank
        calls this (to hand over its image pools, and to check that the ranks' weights agree); rank 0 writes."""
        pools = dist.gather({"A": model.fake_A_pool.state_dict(), "B": model.fake_B_pool.state_dict()})
        check_same_weights(dist, model.nets(), self.dir)
        run.saved_steps = run.steps
        if not dist.main:
            return
        state = {"format": STATE_FORMAT, "options": options, "run": run.state(), "model": model.training_state(),
                 "pools_by_rank": pools, "rng": {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                 "log_bytes": log_bytes}
        next_path = self.state_path.with_name("latest_state.next.pth")
        atomic_save(state, next_path)
        if self.state_path.exists():
            os.replace(self.state_path, self.state_path.with_name("latest_state.prev.pth"))
        os.replace(next_path, self.state_path)
        for label in ["latest"] + ([epoch_label] if epoch_label else []):
            for k, net in model.nets().items():
                atomic_save({n: t.detach().cpu().contiguous() for n, t in net.state_dict().items()},
                            self.dir / f"{label}_net_{k}.pth")

    def load_latest_state(self) -> dict:
        """The newest intact training state: latest_state.pth, else the one before it."""
        candidates = [self.state_path.with_name(n) for n in
                      ("latest_state.pth", "latest_state.next.pth", "latest_state.prev.pth")]
        errors = []
        for path in candidates:
            if not path.exists():
                continue
            try:
                state = load_file(path)
                if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                    raise CheckpointError(f"{path}: not a minicycle training state")
            except CheckpointError as e:
                errors.append(str(e))
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
                continue
            if errors:
                print(f"resuming from the older intact checkpoint {path}", file=sys.stderr)
            return state
        if errors:
            raise CheckpointError(f"no intact training state in {self.dir}: " + "; ".join(errors))
        raise CheckpointError(f"--continue_train: nothing to resume in {self.dir} (no latest_state.pth)")


def restore(model: "CycleGAN", run: Run, state: dict, dist: Dist, device: torch.device) -> None:
    """Everything a saved training state holds, back in place: the model's state, this rank's pools, the
    counters and history, the RNGs. Adam comes back in its default form (a state saved by a capturable Adam,
    on a GPU, resumes anywhere; --cuda_graph makes it capturable again once loaded)."""
    for name in ("optimizer_G", "optimizer_D"):
        for group in state["model"][name]["param_groups"]:
            group["capturable"] = False
        for moments in state["model"][name]["state"].values():
            moments["step"] = moments["step"].cpu()
    model.load_training_state(state["model"])
    pools = state.get("pools_by_rank", [])
    if len(pools) == dist.world:
        model.fake_A_pool.load_state_dict(pools[dist.rank]["A"], device)
        model.fake_B_pool.load_state_dict(pools[dist.rank]["B"], device)
    for k, v in state["run"].items():
        setattr(run, k, v)
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
