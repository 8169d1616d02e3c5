"""Compare PT-Net with an nnU-Net-style DynUNet: parameters, training-step time and peak memory.

Both networks get the same multimodal patch and batch. Each one runs in a fresh
process, so the CPU peak-memory figure of one does not hide the other's.

Per network the script records:

- parameter count;
- forward + backward seconds per iteration (cross-entropy loss on random labels,
  no optimizer step): the median of ``--repeats`` timed iterations after
  ``--warmup`` untimed ones;
- peak memory in MiB. On CUDA: ``torch.cuda.max_memory_allocated`` over the
  iterations, weights and gradients included. On CPU: the increase of the
  process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
  from just before the first iteration, after the network and the batch were
  built, so the weights are excluded and gradient buffers included.

DynUNet is configured with nnU-Net's planning rules for the patch and voxel
spacing (``plan_nnunet_like``). Kernels are 3 wide, except 1 along an axis whose
spacing is at least twice the finest one, until pooling has brought that axis
within a factor 2. A level down-samples by 2 each axis whose spacing is within a
factor 2 of the finest and whose feature size stays at least 4. Filters are 32, 64,
128, ... capped at 320, with instance normalisation, LeakyReLU and no deep
supervision. For 320 x 320 x 8 at 0.35 x 0.35 x 4.44 mm this gives seven levels with
strides (2, 2, 1) three times, (2, 2, 2), then (2, 2, 1) twice.

Usage::

    python benchmarks/benchmark_network.py --patch 128 128 8 --batch 2 --device cpu --preset small --repeats 3
    python benchmarks/benchmark_network.py --patch 320 320 8 --batch 2 --device cuda --repeats 10

Results go to ``--output`` (JSON) and the same path with ``.md`` (a Markdown table),
by default ``benchmarks/results/network_<device>.json``, or ``network_<device>_small.json``
with ``--preset small``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))  # makes ``scripts`` importable here and in the worker processes

import torch  # noqa: E402

import monai  # noqa: E402
from monai.networks.nets import DynUNet  # noqa: E402
from scripts.ptnet import SMALL_PRESET, SPATIAL_DIVISOR, PTNet, nearest_valid_size  # noqa: E402

# Finest and through-plane spacing of the parotid MRI that PT-Net was designed for:
# in-plane 0.28-0.43 mm, slices 3.85-6.50 mm apart (mean 4.44 mm).
DEFAULT_SPACING_MM = (0.35, 0.35, 4.44)


def plan_nnunet_like(
    patch: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    base_filters: int = 32,
    max_filters: int = 320,
    min_feature_size: int = 4,
) -> dict:
    """Plan DynUNet kernels, strides and filters for ``patch`` with nnU-Net's rules (see the module docstring).

    Returns:
        Dict with ``kernel_size`` and ``strides`` (one (X, Y, Z) entry per resolution level, the
        first stride 1), ``upsample_kernel_size`` (strides without the first) and ``filters``.
    """
    size = list(patch)
    spacing = list(spacing_mm)
    kernel_3d = [False, False, False]
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1, 1, 1)]

    while True:
        finest = min(spacing)
        for axis in range(3):
            if spacing[axis] / finest < 2:
                kernel_3d[axis] = True  # once an axis gets 3-wide kernels it keeps them
        kernels.append(tuple(3 if is_3d else 1 for is_3d in kernel_3d))

        pool = tuple(
            2 if spacing[axis] / finest < 2 and size[axis] // 2 >= min_feature_size else 1 for axis in range(3)
        )
        if pool == (1, 1, 1):
            break
        strides.append(pool)
        size = [s // p for s, p in zip(size, pool)]
        spacing = [s * p for s, p in zip(spacing, pool)]

    filters = [min(base_filters * 2**level, max_filters) for level in range(len(strides))]
    return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:], "filters": filters}


def dynunet_plan(patch: tuple[int, int, int], spacing_mm, preset: str) -> dict:
    """Return the DynUNet plan. The small preset divides its filters by 4, as SMALL_PRESET divides PT-Net's channels."""
    base, cap = (8, 80) if preset == "small" else (32, 320)
    return plan_nnunet_like(patch, spacing_mm, base_filters=base, max_filters=cap)


def build_network(name: str, in_channels: int, patch: tuple[int, int, int], spacing_mm, preset: str) -> torch.nn.Module:
    """Build ``"ptnet"`` or ``"dynunet"`` for ``in_channels`` modalities and two classes."""
    if name == "ptnet":
        kwargs = dict(SMALL_PRESET) if preset == "small" else {}
        return PTNet(in_channels=in_channels, out_channels=2, **kwargs)

    plan = dynunet_plan(patch, spacing_mm, preset)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=2,
        norm_name="instance",
        deep_supervision=False,
        res_block=False,
        **plan,
    )


def measure(
    name: str,
    in_channels: int,
    patch: list[int],
    batch: int,
    device: str,
    warmup: int,
    repeats: int,
    spacing_mm: tuple[float, float, float],
    preset: str,
) -> dict:
    """Time forward + backward of one network and record its peak memory, in a worker process."""
    torch.manual_seed(0)
    dev = torch.device(device)
    net = build_network(name, in_channels, tuple(patch), spacing_mm, preset).to(dev).train()
    images = torch.randn(batch, in_channels, *patch, device=dev)
    labels = torch.randint(0, 2, (batch, *patch), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        net.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        loss_fn(net(images), labels).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    for _ in range(warmup):
        step()
    seconds = [step() for _ in range(repeats)]

    if dev.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024

    result = {
        "network": name,
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds_per_iteration_median": statistics.median(seconds),
        "seconds_per_iteration_all": seconds,
        "peak_memory_mib": peak_mib,
    }
    if name == "dynunet":
        plan = dynunet_plan(tuple(patch), spacing_mm, preset)
        result["plan"] = {key: [list(v) if isinstance(v, tuple) else v for v in values] for key, values in plan.items()}
    return result


def run_in_fresh_process(**kwargs) -> dict:
    """Run ``measure`` in a new spawned process and return its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        return executor.submit(measure, **kwargs).result()


def to_markdown(report: dict) -> str:
    """Format the report as a Markdown table with a header line of the settings."""
    settings = report["settings"]
    lines = [
        f"# PT-Net vs DynUNet (nnU-Net plan), {settings['device']}",
        "",
        f"Patch {tuple(settings['patch'])} (X, Y, Z), batch {settings['batch']}, {settings['in_channels']} modalities, "
        f"preset {settings['preset']}, median of {settings['repeats']} iterations after {settings['warmup']} warm-up; "
        f"{report['environment']['device_name']}, torch {report['environment']['torch']}, "
        f"{report['environment']['torch_threads']} threads.",
        f"Memory: {report['memory_method']}.",
        "",
        "| network | parameters (M) | forward+backward (s/iter) | peak memory (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['network']} | {row['parameters'] / 1e6:.2f} | {row['seconds_per_iteration_median']:.3f} "
            f"| {row['peak_memory_mib']:.0f} |"
        )
    ratios = report["ratios_ptnet_over_dynunet"]
    lines.append(
        f"| ratio PT-Net / DynUNet | {ratios['parameters']:.2f} | {ratios['seconds_per_iteration']:.2f} "
        f"| {ratios['peak_memory']:.2f} |"
    )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
        temporary = handle.name
    os.chmod(temporary, 0o644)  # NamedTemporaryFile creates 0600 files
    os.replace(temporary, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[320, 320, 8], metavar=("X", "Y", "Z"),
                        help="patch size in voxels, through-plane axis last, multiples of 64, 64, 8 "
                             "(default 320 320 8)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--in-channels", type=int, default=3, choices=(1, 2, 3),
                        help="number of modalities (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per network (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing (default 1)")
    parser.add_argument("--preset", choices=("default", "small"), default="default",
                        help="PT-Net defaults, or SMALL_PRESET with DynUNet filters divided by 4")
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING_MM), metavar=("X", "Y", "Z"),
                        help="voxel spacing in mm for the DynUNet plan (default 0.35 0.35 4.44)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON output path, with the Markdown table beside it as .md "
                             "(default benchmarks/results/network_<device>[_small].json)")
    args = parser.parse_args(argv)

    if tuple(args.patch) != nearest_valid_size(args.patch):
        parser.error(
            f"--patch {tuple(args.patch)} is not a multiple of {SPATIAL_DIVISOR}. "
            f"The nearest valid patch is {nearest_valid_size(args.patch)}."
        )
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be at least 1 and --warmup at least 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False; use --device cpu.")
    if args.output is None:
        suffix = "_small" if args.preset == "small" else ""
        args.output = BUNDLE_ROOT / "benchmarks" / "results" / f"network_{args.device}{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Measure both networks, print the table and write the JSON and Markdown reports."""
    args = parse_args(argv)
    common = {
        "in_channels": args.in_channels,
        "patch": list(args.patch),
        "batch": args.batch,
        "device": args.device,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "spacing_mm": tuple(args.spacing),
        "preset": args.preset,
    }

    results = []
    for name in ("ptnet", "dynunet"):
        print(f"measuring {name} ...", flush=True)
        results.append(run_in_fresh_process(name=name, **common))
    ptnet, dynunet = results

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name(0)
        memory_method = "torch.cuda.max_memory_allocated (weights and gradients included)"
    else:
        device_name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
        memory_method = "increase of peak RSS (resource ru_maxrss) during the iterations, weights excluded"
    report = {
        "settings": {**common, "spacing_mm": list(args.spacing)},
        "environment": {
            "torch": torch.__version__,
            "monai": monai.__version__,
            "python": platform.python_version(),
            "device_name": device_name,
            "torch_threads": torch.get_num_threads(),
        },
        "memory_method": memory_method,
        "results": results,
        "ratios_ptnet_over_dynunet": {
            "parameters": ptnet["parameters"] / dynunet["parameters"],
            "seconds_per_iteration": ptnet["seconds_per_iteration_median"] / dynunet["seconds_per_iteration_median"],
            "peak_memory": (
                ptnet["peak_memory_mib"] / dynunet["peak_memory_mib"] if dynunet["peak_memory_mib"] > 0 else math.nan
            ),
        },
    }

    markdown = to_markdown(report)
    write_atomic(args.output, json.dumps(report, indent=2) + "\n")
    write_atomic(args.output.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
