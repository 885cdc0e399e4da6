"""The learning benchmark's picture: val top-1 against storage per image (log x), and against epochs.

Left: one line for pixel arms (full JPEG, the JPEGs at the tokens' resolution, the equal-byte copies,
the frontier's budgets), one for token arms (the main tokens with each augmentation and the frontier's
variants), and points for the pre-trained arms (MTM, M3I, ADDP) at the main tokens' bytes/image.
Right (when the result has a ``curve``): top-1 against fine-tuning epochs, one line per arm, so the
reader sees whether the gap between tokens and pixels opens or closes as training goes on. Reads only
``bench/learning.py``'s result dict.
"""

from __future__ import annotations

from pathlib import Path


def points(result: dict) -> dict[str, list[tuple[float, float, str]]]:
    """{"pixel" | "token" | "mtm" | "m3i" | "addp": [(bytes/image, top-1 in %, label), ...]} from a result."""
    out: dict[str, list[tuple[float, float, str]]] = {k: [] for k in ("pixel", "token", "mtm", "m3i", "addp")}
    arms = result.get("arms", {})
    if result.get("top1_pixel") is not None:
        out["pixel"].append((result["bytes_per_image_jpeg"], 100 * result["top1_pixel"], "JPEG (full)"))
    if result.get("top1_pixel_matched") is not None:
        out["pixel"].append((result["bytes_per_image_jpeg"], 100 * result["top1_pixel_matched"],
                             f"JPEG at {result.get('token_resolution')} px"))
    for fmt, run in arms.get("jpeg_equal", {}).get("formats", {}).items():
        if run.get("reachable"):
            out["pixel"].append((run["bytes_per_image"], 100 * run["top1"], f"{fmt} {run['setting']['side']}px"))
    grid, k = result.get("token_grid"), result.get("budget", {}).get("vocab")
    for key, value in result.items():
        arm, _, aug = key.removeprefix("top1_").partition("_")
        if not key.startswith("top1_") or arm not in ("token", "mtm", "m3i", "addp") or value is None \
                or aug.endswith(("spread", "seeds", "best")):
            continue
        label = (f"{grid}x{grid} K={k}" if grid else "tokens") if arm == "token" else arm.upper()
        out[arm].append((result["bytes_per_image_token"], 100 * value, label + (f" {aug}" if aug else "")))
    for p in result.get("frontier", []):
        if p.get("reachable", True) and p.get("top1") is not None:
            out[p["kind"]].append((p["bytes_per_image"], 100 * p["top1"], p["label"]))
    return out


def plot(result: dict, path: Path) -> None:
    """Write the frontier PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in result.get("curve", {}).items() if v}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    style = {"pixel": ("tab:blue", "o-"), "token": ("tab:orange", "s-"), "mtm": ("tab:green", "^"),
             "m3i": ("tab:red", "v"), "addp": ("tab:purple", "D")}
    for kind, pts in points(result).items():
        if not pts:
            continue
        pts = sorted(pts)
        color, marker = style[kind]
        name = {"pixel": "pixels (JPEG / WebP / AVIF)", "token": "tokens, from scratch"}.get(kind, kind.upper())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, label=name, markersize=7)
        for x, y, label in pts:
            if kind in ("pixel", "token"):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -11), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("storage per image, bytes (log)")
    ax.set_ylabel("val top-1 (%)")
    budget = result.get("budget", {})
    ax.set_title(f"{result['train_images']} train / {result['val_images']} val images; "
                 f"{round(budget.get('finetune_steps', 0) * budget.get('budget_scale', 1))} fine-tune steps at "
                 f"{budget.get('resolution')} px", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center right")
    if curves:
        plot_curves(axes[0, 1], curves)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(ax, curves: dict[str, list]) -> None:
    """Top-1 against fine-tuning epochs: one line per arm (``curve``: arm -> [(epochs, top-1), ...]); the
    runs of one arm at other seeds (``<arm>_s<seed>``) share its colour, dashed."""
    colors: dict[str, str] = {}
    for key, pts in sorted(curves.items()):
        arm, _, seed = key.rpartition("_s")
        arm = arm if seed.isdigit() else key
        color = colors.setdefault(arm, f"C{len(colors) % 10}")
        marker = "o" if arm.startswith("pixel") else ("^" if arm.startswith(("mtm", "m3i", "addp")) else "s")
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker + ("--" if arm != key else "-"),
                color=color, label=key, markersize=5)
    ax.set_xlabel("fine-tuning epochs")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("top-1 as training goes on (25 / 50 / 75 / 100 % of the steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
