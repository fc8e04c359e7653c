"""The report's figures (matplotlib, headless): PSNR vs ms/frame, PSNR vs energy, and side-by-side crops.

Every figure names the device the latencies were measured on, so a plot never travels without its machine.
"""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_psnr_vs", "plot_crops", "crop_box"]


def plot_psnr_vs(rows: list[dict], axis: str, device: str, path: Path) -> Path:
    """Scatter of held-out PSNR against ms/frame (axis="latency") or energy/frame (axis="energy").

    For latency, a filled marker is the fastest backend and a hollow one the same model on the PyTorch reference,
    joined by a line, so the kernels' gain is visible per variant.
    """
    if axis not in ("latency", "energy"):
        raise ValueError(f"axis must be latency or energy, got {axis!r}")
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    colors = plt.cm.tab10.colors
    for index, row in enumerate(rows):
        color = colors[index % len(colors)]
        if axis == "latency":
            x = row["ms_per_frame"]
            if row["backend"] != "torch":
                ax.plot([row["ms_torch"], x], [row["psnr"], row["psnr"]], color=color, lw=1, alpha=0.6)
                ax.scatter([row["ms_torch"]], [row["psnr"]], facecolors="none", edgecolors=[color], s=50)
        else:
            x = row["energy_mj"]
        ax.scatter([x], [row["psnr"]], color=color, s=60, label=row["variant"], zorder=3)
    if axis == "latency":
        ax.set_xscale("log")
        ax.set_xlabel("ms per frame (filled: fastest backend, hollow: PyTorch reference)")
    else:
        ax.set_xlabel("energy per frame (mJ, 45 nm unit energies)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(f"PSNR vs {'latency' if axis == 'latency' else 'energy'} on {device}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def crop_box(height: int, width: int, side: int) -> tuple[int, int, int, int]:
    """Centre square (top, left, bottom, right) of `side` pixels, clipped to the image."""
    side = max(1, min(side, height, width))
    top, left = (height - side) // 2, (width - side) // 2
    return top, left, top + side, left + side


def plot_crops(render_dir: Path, variants: list[str], rows: dict[str, dict], device: str, side: int,
               path: Path) -> Path:
    """Ground truth and every variant's render (fastest backend) of the report view, the same centre crop each."""
    render_dir = Path(render_dir)
    panels = [("ground truth", render_dir / "ground_truth.png")]
    for name in variants:
        row = rows[name]
        panels.append((f"{name}\n{row['psnr']:.2f} dB, {row['ms_per_frame']:.0f} ms", render_dir /
                       f"{name}_{row['backend']}.png"))
    columns = min(len(panels), 5)
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 3.2 * lines), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image_path) in zip(axes.flat, panels):
        image = iio.imread(image_path)
        top, left, bottom, right = crop_box(image.shape[0], image.shape[1], side)
        ax.imshow(image[top:bottom, left:right], interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"held-out view, centre crop; latency on {device}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
