"""Checkpoint files: atomic writes, safe loads, official-key compatibility, and a readable
diagnosis when a generator file does not fit the flags."""

import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message is one line for the user."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A crash (or a full disk) at any moment leaves either the old file or the new one, never a
    half-written file under the final name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # A Ctrl-C inside torch.save leaves its zip writer mid-record; closing it then raises a
        # RuntimeError with the KeyboardInterrupt as context: the user asked to stop, so stop.
        if not isinstance(e, KeyboardInterrupt) and caused_by(e, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        # torch.save reports a failed write (disk full ...) as a RuntimeError of its zip writer, with the
        # OSError only as its context: raise the OSError itself, naming the file that was being written.
        err = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from e
        raise
    _fsync_dir(path.parent)


def caused_by(e: BaseException, kind: type) -> bool:
    """Whether `e` or any exception in its cause/context chain is a `kind`."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        # BatchNorm has affine (1-D) weights; InstanceNorm has none, though files from PyTorch < 0.4 carry
        # stale running_mean/var for it, so running stats alone do not tell the two apart.
        info["norm"] = "batch" if any(k.endswith(".weight") and v.dim() == 1 for k, v in state.items()) else "instance"
    elif "model.model.0.weight" in keys:
        depth = sum(1 for k, v in state.items() if k.endswith("weight") and v.dim() == 4) // 2  # down+up conv per level
        info["netG"] = {8: "unet_256", 7: "unet_128"}.get(depth, f"unet with {depth} downsamplings")
        w = state["model.model.0.weight"]
        info["ngf"], info["input_nc"] = int(w.shape[0]), int(w.shape[1])
        info["output_nc"] = int(state["model.model.3.weight"].shape[1]) if "model.model.3.weight" in keys else None
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
