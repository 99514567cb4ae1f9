"""What a run writes for people to read: train_opt.txt, loss_log.txt, and browsable HTML pages
(training samples with loss curves, inference results)."""

import html
import io
import time
from pathlib import Path

import torch
from PIL import Image

from kernels.runtime import write_atomic
from minicycle.data import tensor_to_image

STYLE = ("body{font-family:sans-serif;margin:1em}img{image-rendering:pixelated;border:1px solid #ccc}"
         "td{text-align:center;font-size:12px;padding:4px}svg{background:#fafafa;border:1px solid #ddd}")


def save_image_atomic(img: Image.Image, path: Path) -> None:
    data = io.BytesIO()
    img.save(data, format=Image.registered_extensions()[path.suffix.lower()])
    write_atomic(path, data.getbuffer())


def write_options(options: dict, defaults: dict, path: Path) -> None:
    """train_opt.txt in the official format: every option, and its default where it differs."""
    lines = ["----------------- Options ---------------"]
    for k, v in sorted(options.items()):
        note = f"\t[default: {defaults[k]}]" if k in defaults and defaults[k] != v else ""
        lines.append(f"{k:>25}: {str(v):<30}{note}")
    lines.append("----------------- End -------------------")
    write_atomic(path, ("\n".join(lines) + "\n").encode())


class LossLog:
    """loss_log.txt in the official format, one line per logged point. Only the main process (rank 0) writes."""

    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write

    def size(self) -> int:
        """Bytes written so far: a saved training state records it, see start."""
        return self.path.stat().st_size if self.path.exists() else 0

    def start(self, resumed_size: int | None) -> None:
        """Head the lines of this start or resume. Resuming, first drop the lines written after the state being
        resumed was saved (by a run stopped or killed later, or when an older state is resumed), so that
        each iteration's line appears once."""
        if not self.write:
            return
        if resumed_size is not None and self.path.exists():
            data = self.path.read_bytes()
            if len(data) > resumed_size:
                write_atomic(self.path, data[:resumed_size])
        with open(self.path, "a") as f:
            f.write(f"================ Training Loss ({time.strftime('%c')}) ================\n")

    def line(self, means: dict[str, float], *, epoch: int, iters: int, compute: float, data: float) -> str:
        """One line, appended to the file: `compute` and `data` are seconds per image."""
        line = f"(epoch: {epoch}, iters: {iters}, time: {compute:.3f}, data: {data:.3f}) "
        line += " ".join(f"{k}: {v:.3f}" for k, v in means.items())
        if self.write:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return line


def loss_curves_svg(history: list[tuple[float, dict[str, float]]], width: int = 720, height: int = 240) -> str:
    """One polyline per loss over (fractional epoch, value); a plain inline SVG, no plotting library."""
    if len(history) < 2:
        return "<p>(loss curves appear after a few logged iterations)</p>"
    names = list(history[0][1])
    xs = [x for x, _ in history]
    top = max(max(v.values()) for _, v in history) or 1.0
    x0, x1 = min(xs), max(xs)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    pad = 30

    def px(x: float, y: float) -> str:
        fx = pad + (x - x0) / ((x1 - x0) or 1.0) * (width - 2 * pad)
        fy = height - pad - min(y, top) / top * (height - 2 * pad)
        return f"{fx:.1f},{fy:.1f}"

    parts = [f'<svg width="{width}" height="{height + 20 * ((len(names) + 3) // 4)}">']
    for i, name in enumerate(names):
        pts = " ".join(px(x, v[name]) for x, v in history)
        parts.append(f'<polyline fill="none" stroke="{colors[i % 8]}" stroke-width="1.2" points="{pts}"/>')
        lx, ly = pad + (i % 4) * 170, height + 12 + 20 * (i // 4)
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colors[i % 8]}"/>'
                     f'<text x="{lx + 14}" y="{ly}" font-size="12">{html.escape(name)}</text>')
    parts.append(f'<text x="{pad}" y="14" font-size="12">max {top:.3f}</text>'
                 f'<text x="{pad}" y="{height - 8}" font-size="12">epoch {x0:.2f}</text>'
                 f'<text x="{width - pad - 80}" y="{height - 8}" font-size="12">epoch {x1:.2f}</text></svg>')
    return "\n".join(parts)


def training_page(web_dir: Path, name: str, rows: list[tuple[int, list[str]]],
                  history: list[tuple[float, dict[str, float]]]) -> None:
    """checkpoints/NAME/web/index.html: loss curves, then one row of sample images per epoch (newest first).
    `rows` holds (epoch, [image file names under web/images])."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='60'>"
           f"<title>{html.escape(name)}</title><style>{STYLE}</style></head><body>",
           f"<h2>{html.escape(name)}: training</h2>", "<h3>Losses</h3>", loss_curves_svg(history)]
    for epoch, files in sorted(rows, reverse=True):
        out.append(f"<h3>epoch {epoch}</h3><table><tr>")
        for f in files:
            label = f.split("_", 1)[1].rsplit(".", 1)[0]
            out.append(f"<td><img src='images/{html.escape(f)}' width='128'><br>{html.escape(label)}</td>")
        out.append("</tr></table>")
    out.append("</body></html>")
    write_atomic(web_dir / "index.html", "\n".join(out).encode())


def write_training_page(web: Path, name: str, visuals: dict[str, torch.Tensor], epoch: int,
                        history: list[tuple[float, dict[str, float]]]) -> None:
    """Save the first sample of each of this iteration's `visuals` as web/images/epoch<NNN>_<label>.png,
    then rewrite the page over every epoch's images there."""
    images = web / "images"
    images.mkdir(parents=True, exist_ok=True)
    for label, t in visuals.items():
        save_image_atomic(tensor_to_image(t[0].float().cpu()), images / f"epoch{epoch:03d}_{label}.png")
    rows: dict[int, list[str]] = {}
    for f in sorted(images.glob("epoch*_*.png")):
        rows.setdefault(int(f.name[5:8]), []).append(f.name)
    order = {k: i for i, k in enumerate(visuals)}
    ordered = [(e, sorted(fs, key=lambda n: order.get(n[9:-4], 99))) for e, fs in rows.items()]
    training_page(web, name, ordered, history)


def results_page(out_dir: Path, title: str, rows: list[tuple[str, list[tuple[str, str]]]], summary: str = "") -> None:
    """results/NAME/test_latest/index.html: `summary` (e.g. the mean error), then one row per input,
    `rows` = (name, [(label, image path)])."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body><h2>{html.escape(title)}</h2>"]
    if summary:
        out.append(f"<p>{html.escape(summary)}</p>")
    out.append("<table>")
    for name, images in rows:
        out.append(f"<tr><td>{html.escape(name)}</td>")
        for label, path in images:
            out.append(f"<td><img src='{html.escape(path)}' width='256'><br>{html.escape(label)}</td>")
        out.append("</tr>")
    out.append("</table></body></html>")
    write_atomic(out_dir / "index.html", "\n".join(out).encode())
