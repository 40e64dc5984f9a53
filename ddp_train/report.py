"""Pictures and tables of a finished run: learning curves and per-superclass test accuracy (rank 0)."""
import csv
from pathlib import Path

from data_prep.files import atomic_path


def _figure(width: float, height: float, left: float = 0.06):
    """A figure saved straight to PNG, without pyplot's import and global figure registry and with fixed margins
    instead of tight_layout: both pictures of a run in 0.67 s instead of 0.80 s (a fresh process, median of 3, CPU)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left, right=0.98, top=0.92, bottom=0.12, wspace=0.2)
    return fig


def learning_curves(history: list, path: Path) -> Path:
    """Loss and top-1, train and test, per epoch."""
    epochs = list(range(len(history)))
    fig = _figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("train_loss", "train (label-smoothed)"), ("test_loss", "test")):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_top1", "train top-1"), ("test_top1", "test top-1"), ("test_top5", "test top-5"),
                       ("test_super_top1", "test superclass top-1")):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (log scale)", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy", ylim=(0, 100))
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_path(path) as tmp:  # a full disk leaves the old file or none, never a truncated picture
        fig.savefig(tmp, dpi=100, format="png")
    return path


def per_superclass(counts: dict, names: list, csv_path: Path, png_path: Path) -> list:
    """Fine and superclass top-1 for the test images of each superclass the test set has (a custom dataset may
    lack some), as a CSV and a bar chart."""
    rows = [{"superclass": name, "images": n, "top1": round(100 * counts["top1_hits"][i] / n, 2),
             "superclass_top1": round(100 * counts["super_top1_hits"][i] / n, 2)}
            for i, (name, n) in enumerate(zip(names, counts["images"], strict=True)) if n]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = _figure(11, 5, left=0.26)
    ax = fig.subplots()
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["superclass_top1"] for r in rows], height=0.4, label="superclass top-1")
    ax.barh([y - 0.2 for y in ys], [r["top1"] for r in rows], height=0.4, label="fine top-1")
    ax.set_yticks(list(ys), [r["superclass"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="% of the superclass's test images", xlim=(0, 100), title="test accuracy by superclass")
    ax.legend(loc="lower right")
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return rows
