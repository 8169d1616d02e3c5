"""Time the anatomy-aware loss against Dice loss and Dice plus Hausdorff distance loss.

All three losses get the same logits and label in one run: a patch of random
logits (batch, 2, X, Y, Z) that requires gradients, and a label with one
ellipsoidal tumour per sample. Each measurement is forward plus backward of the
loss alone (no network), the median of ``--repeats`` timed calls after
``--warmup`` untimed ones. The report gives seconds per call and the ratio to
``DiceLoss``:

- ``DiceLoss``: MONAI's soft Dice, foreground only;
- ``DiceAnatomyAwareLoss``: Dice plus the anatomy-aware centre distance (this bundle);
- ``Dice + HausdorffDTLoss``: Dice plus MONAI's distance-transform Hausdorff loss,
  the distance-based loss that the anatomy-aware loss replaces.

Usage::

    python benchmarks/benchmark_loss.py --patch 320 320 8 --batch 2 --device cpu --repeats 5

Results go to ``--output`` (JSON) and the same path with ``.md``, by default
``benchmarks/results/loss_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))  # makes ``scripts`` and ``benchmarks`` importable

import torch  # noqa: E402
from monai.losses import DiceLoss, HausdorffDTLoss  # noqa: E402

from benchmarks.benchmark_network import write_atomic  # noqa: E402
from scripts.losses import DiceAnatomyAwareLoss  # noqa: E402


class DiceHausdorffLoss(torch.nn.Module):
    """Dice loss plus MONAI's HausdorffDTLoss, both on softmax of the logits, foreground only."""

    def __init__(self) -> None:
        super().__init__()
        options = {"softmax": True, "to_onehot_y": True, "include_background": False}
        self.dice = DiceLoss(**options)
        self.hausdorff = HausdorffDTLoss(**options)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, label) + self.hausdorff(logits, label)


def make_batch(batch: int, patch: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return logits (B, 2, X, Y, Z) and a class-index label (B, 1, X, Y, Z) with one tumour per sample."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 2, *patch, generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size) for size in patch], indexing="ij"))
    label = torch.zeros(batch, 1, *patch)
    for index in range(batch):
        centre = (torch.rand(3, generator=generator) - 0.5).view(3, 1, 1, 1)
        label[index, 0] = (((grid - centre) / 0.3) ** 2).sum(0) <= 1
    return logits.to(device), label.to(device)


def measure(loss: torch.nn.Module, logits: torch.Tensor, label: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Return the seconds of each timed forward + backward call."""
    times = []
    for step in range(warmup + repeats):
        inputs = logits.detach().clone().requires_grad_(True)
        if inputs.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss(inputs, label).backward()
        if inputs.is_cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def to_markdown(report: dict) -> str:
    """Format the report as a Markdown table with the settings in a header line."""
    settings, environment = report["settings"], report["environment"]
    lines = [
        f"# Loss time, {settings['device']}",
        "",
        f"Logits {settings['batch']} x 2 x {tuple(settings['patch'])} (X, Y, Z), forward + backward of the loss alone, "
        f"median of {settings['repeats']} calls after {settings['warmup']} warm-up; {environment['device_name']}, "
        f"torch {environment['torch']}, {environment['torch_threads']} threads.",
        "",
        "| loss | seconds per call | ratio to DiceLoss |",
        "|---|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['loss']} | {row['seconds_median']:.4f} | {row['ratio_to_dice']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[320, 320, 8], metavar=("X", "Y", "Z"),
                        help="patch size in voxels, through-plane axis last (default 320 320 8)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per loss (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON output path, with the Markdown table beside it as .md "
                             "(default benchmarks/results/loss_<device>.json)")
    args = parser.parse_args(argv)
    if min(args.patch) < 2 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--patch sizes must be at least 2, --batch and --repeats at least 1, --warmup at least 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False; use --device cpu.")
    if args.output is None:
        args.output = BUNDLE_ROOT / "benchmarks" / "results" / f"loss_{args.device}.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Time the three losses, print the table and write the JSON and Markdown reports."""
    args = parse_args(argv)
    device = torch.device(args.device)
    logits, label = make_batch(args.batch, tuple(args.patch), device)
    losses = {
        "DiceLoss": DiceLoss(softmax=True, to_onehot_y=True, include_background=False),
        "DiceAnatomyAwareLoss": DiceAnatomyAwareLoss(spacing=(0.4, 0.4, 4.4)),
        "Dice + HausdorffDTLoss": DiceHausdorffLoss(),
    }

    results = []
    for name, loss in losses.items():
        print(f"timing {name} ...", flush=True)
        times = measure(loss.to(device), logits, label, args.warmup, args.repeats)
        results.append({"loss": name, "seconds_median": statistics.median(times), "seconds": times})
    dice_seconds = results[0]["seconds_median"]
    for row in results:
        row["ratio_to_dice"] = row["seconds_median"] / dice_seconds

    device_name = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    )
    report = {
        "settings": {
            "patch": list(args.patch),
            "batch": args.batch,
            "device": args.device,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "environment": {"torch": torch.__version__, "device_name": device_name, "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    markdown = to_markdown(report)
    print(markdown)
    write_atomic(args.output, json.dumps(report, indent=2) + "\n")
    write_atomic(args.output.with_suffix(".md"), markdown)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
