"""Draw the training and validation loss curves of a run from its TensorBoard event files.

Usage: python docs/plot_curves.py OUTPUT/tensorboard docs/loss-curves.png
"""

import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(event_dir: str, tag: str) -> tuple[list[int], list[float]]:
    accumulator = EventAccumulator(event_dir, size_guidance={"scalars": 0})  # 0 keeps every point
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return [], []
    events = accumulator.Scalars(tag)
    return [event.step for event in events], [event.value for event in events]


def main(event_dir: str, output: str) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for tag, style in (("train/loss", "-"), ("val/loss", "o-")):
        steps, values = read_scalars(event_dir, tag)
        if not steps:
            raise SystemExit(f"error: no {tag} scalars in {event_dir}; pass the run's tensorboard folder")
        axes.plot(steps, values, style, label=tag, markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title("train/loss (label-smoothed) and val/loss (NLL)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
