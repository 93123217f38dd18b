"""`longctx info`: what the installed build contains, which GPUs this machine has, and which
kernel families run on each of them.

A kernel family is available on a device when build_info() lists a kernel of that family for the
device's kind ("cpu" or "cuda") and, for CUDA, the build targets an architecture the GPU can run:
an arch-specific target such as 90a runs only on that exact compute capability (9.0), a plain
target such as 90 on the same major version at an equal or higher minor one. The families come
from build_info(); `PLANNED_FAMILIES` only names the ones the roadmap adds, so that the report can
say they are not in this build yet. Ring attention has no kernels of its own: it runs where both
flash_fwd and flash_bwd run, and its exchange is NCCL from C++ or torch.distributed.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["collect_info", "format_info", "format_summary", "arch_runs_on", "gpu_properties",
           "PLANNED_FAMILIES", "add_parser", "run"]

PLANNED_FAMILIES = ("flash_fwd", "flash_bwd", "kvcache")


def arch_runs_on(arch: str, capability: Tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("90a", "90", "100a") runs on a GPU of `capability`."""
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(\d)([af]?)", arch.strip())
    if not m:
        return False
    major, minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
    if suffix == "a":
        return capability == (major, minor)
    if suffix == "f":  # family-specific (CUDA 12.9+): same major, same or later minor
        return capability[0] == major and capability[1] >= minor
    return capability[0] == major and capability[1] >= minor


def peak_bandwidth_gbps(memory_clock_khz: Optional[int], bus_width_bits: Optional[int]
                        ) -> Optional[float]:
    """Peak DRAM bandwidth in GB/s (1e9 B/s) from the clock and bus width the driver reports:
    2 transfers per clock (double data rate) x clock x bus width / 8."""
    if not memory_clock_khz or not bus_width_bits:
        return None
    return 2 * memory_clock_khz * 1e3 * bus_width_bits / 8 / 1e9


def gpu_properties() -> Tuple[List[Dict[str, Any]], str]:
    """The CUDA GPUs torch sees, or ([], why none)."""
    import torch

    if torch.version.cuda is None:
        return [], "torch is a CPU-only build"
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except RuntimeError as e:
        return [], f"CUDA initialisation failed: {str(e).splitlines()[0]}"
    if count == 0:
        return [], "torch.cuda.is_available() is False"
    gpus = []
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        clock = getattr(p, "memory_clock_rate", None)
        width = getattr(p, "memory_bus_width", None)
        gpus.append({
            "index": i,
            "name": p.name,
            "capability": [p.major, p.minor],
            "sm_count": p.multi_processor_count,
            "memory_bytes": int(p.total_memory),
            "memory_clock_khz": clock,
            "memory_bus_width_bits": width,
            "peak_bandwidth_gbps_estimated": peak_bandwidth_gbps(clock, width),
        })
    return gpus, ""


def _families(build: Dict[str, Any]) -> List[str]:
    return sorted({k["family"] for k in build["kernels"]})


def feature_availability(build: Dict[str, Any], gpus: List[Dict[str, Any]]
                         ) -> Dict[str, Dict[str, Any]]:
    """family -> {"cpu": bool, "cuda": {gpu index: bool}, "why": reason when not on a GPU}."""
    out = {}
    for fam in _families(build):
        devices = {k["device"] for k in build["kernels"] if k["family"] == fam}
        on_gpu, why = {}, ""
        for g in gpus:
            cap = tuple(g["capability"])
            ok = "cuda" in devices and any(arch_runs_on(a, cap) for a in build["cuda_archs"])
            on_gpu[g["index"]] = ok
            if not ok:
                why = ("no CUDA kernel compiled" if "cuda" not in devices else
                       f"built for {','.join(build['cuda_archs'])}, the GPU is sm_{cap[0]}{cap[1]}")
        if not gpus:
            why = "no CUDA GPU" if "cuda" in devices else "no CUDA kernel compiled"
        out[fam] = {"cpu": "cpu" in devices, "cuda": on_gpu, "why": why}
    return out


def ring_availability(build: Dict[str, Any], features: Dict[str, Dict[str, Any]]
                      ) -> Optional[Dict[str, Any]]:
    """Ring attention = the flash forward and backward ops + an exchange: where both run."""
    if "flash_fwd" not in features or "flash_bwd" not in features:
        return None
    fwd, bwd = features["flash_fwd"], features["flash_bwd"]
    comm = "NCCL exchange" if build.get("with_nccl") else "torch.distributed exchange"
    return {"cpu": fwd["cpu"] and bwd["cpu"],
            "cuda": {i: ok and bwd["cuda"].get(i, False) for i, ok in fwd["cuda"].items()},
            "why": fwd["why"] or bwd["why"] or f"flash_fwd + flash_bwd, {comm} on GPUs"}


def collect_info() -> Dict[str, Any]:
    from .. import build_info

    build = build_info()
    gpus, why_no_gpu = gpu_properties()
    features = feature_availability(build, gpus)
    ring = ring_availability(build, features)
    if ring is not None:
        features["ring"] = ring
    return {"build": build, "gpus": gpus, "no_gpu_reason": why_no_gpu or None,
            "features": features,
            "planned_not_built": [f for f in PLANNED_FAMILIES if f not in features]}


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def format_info(info: Dict[str, Any]) -> str:
    from ..planner.plan import format_bytes

    b = info["build"]
    lines = [f"longctx {b['version']}", "build:"]
    same = b["torch_built"] == b["torch_runtime"]
    lines.append(f"  torch       {b['torch_runtime']} (built against {b['torch_built']}"
                 f"{'' if same else ': MISMATCH, rebuild longctx for this torch'})")
    if b["with_cuda"]:
        lines.append(f"  CUDA        {b['cuda_built']}, archs {', '.join(b['cuda_archs']) or '-'}")
    else:
        lines.append("  CUDA        none (CPU-only build)")
    lines.append("  ring comm   " + ("NCCL from C++ (csrc/comm/nccl_ring.cpp)" if b.get("with_nccl")
                                     else "torch.distributed (no NCCL communicator compiled)"))
    lines.append(f"  switches    {b['switches']}")
    lines.append("  kernels" + ("     none" if not b["kernels"] else ":"))
    for k in b["kernels"]:
        lines.append(f"    {k['family']:<10} {k['device']:<5} {','.join(k['dtypes']):<16} "
                     f"{','.join(k['features'])}")
    lines.append("GPU:")
    if not info["gpus"]:
        lines.append(f"  no CUDA GPU found ({info['no_gpu_reason']})")
    for g in info["gpus"]:
        bw = g["peak_bandwidth_gbps_estimated"]
        bw_text = (f"{bw:,.0f} GB/s peak memory bandwidth (estimated from the memory clock "
                   f"{g['memory_clock_khz'] / 1e6:.3f} GHz and the {g['memory_bus_width_bits']}"
                   "-bit bus)" if bw else "memory bandwidth unknown")
        cap = g["capability"]
        lines.append(f"  [{g['index']}] {g['name']}, sm_{cap[0]}{cap[1]}, {g['sm_count']} SMs, "
                     f"{format_bytes(g['memory_bytes'])}")
        lines.append(f"      {bw_text}")
    lines.append("features (kernel families of this build):")
    for fam, f in info["features"].items():
        gpu = ", ".join(f"GPU {i}: {_yes(ok)}" for i, ok in f["cuda"].items()) or "GPU: no"
        why = f" ({f['why']})" if f["why"] else ""
        lines.append(f"  {fam:<10} CPU: {_yes(f['cpu'])}  {gpu}{why}")
    if info["planned_not_built"]:
        lines.append(f"  not in this build yet: {', '.join(info['planned_not_built'])}")
    return "\n".join(lines)


def format_summary(info: Dict[str, Any]) -> str:
    """One line: the version, the kind of build, the kernel families per device and the GPUs."""
    b = info["build"]
    kind = (f"CUDA {b['cuda_built']} build for {','.join(b['cuda_archs']) or '-'}"
            if b["with_cuda"] else "CPU-only build")
    devices = sorted({k["device"] for k in b["kernels"]})
    kernels = "; ".join(
        f"{d}: {', '.join(sorted({k['family'] for k in b['kernels'] if k['device'] == d}))}"
        for d in devices) or "none"
    gpus = info["gpus"]
    gpu = (f"{len(gpus)} x {gpus[0]['name']}" if gpus and len({g['name'] for g in gpus}) == 1
           else ", ".join(g["name"] for g in gpus) or "none")
    return (f"longctx {b['version']}: {kind}, switches {b['switches']}, torch "
            f"{b['torch_runtime']}; kernels {kernels}; GPU {gpu}")


def add_parser(sub):
    p = sub.add_parser("info", help="the build, the GPUs found and the features on them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--short", action="store_true",
                   help="one line: version, kind of build, kernel families, GPUs")
    return p


def run(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_summary(info) if args.short else format_info(info))
    return 0
