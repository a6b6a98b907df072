"""The tables of README.md from the probe's JSON (``python summarize.py raw``): one row per configuration
and run, speed ratios against bf16-true of the same run, and the profiled kernels of ViT-bigG-14 by kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Kernel kinds by name, first match wins (nvjet "qq" kernels take two FP8 operands).
KINDS = (
    ("attention (flash)", ("flash_fwd",)),
    ("FP8 GEMM", ("nvjet_sm90_qq", "e4m3_gemm", "f8f8")),
    ("bf16 GEMM", ("nvjet", "gemm", "cutlass")),
    ("LayerNorm", ("layer_norm", "ln_fwd")),
    ("GELU", ("gelu",)),
    ("quantize (cast to FP8)", ("fp8::detail::identity",)),
    ("amax and scale", ("amax", "compute_scale")),
    ("dtype copies (autocast)", ("direct_copy",)),
    ("adds (residual, bias)", ("CUDAFunctor_add",)),
    # bf16 GEMMs whose epilogue adds the bias and GELU are GEMMs above; "gelubias" is matched there
)
# Rows that did not measure what their name says: in the first call (B) ``towers="image"`` found no image
# tower under Fabric's Encoder and converted nothing (fixed before run D, which measured it).
EXCLUDE = {("B", "te-fused-current-image")}


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(key.lower() in low for key in keys)), "other")


def main(raw: Path) -> None:
    runs = {p.stem.split("_")[-1]: json.loads(p.read_text()) for p in sorted(raw.glob("results_*.json"))}
    towers = list(next(iter(runs.values()))["towers"])
    for tower in towers:
        print(f"\n### {tower}\n")
        print(
            "| config | run | images/s | x bf16-true | texts/s | x bf16-true | image cos mean (min) "
            "| text cos mean (min) | top-1 agreement | peak MB | first batch s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        base = {}
        for run, report in runs.items():
            for row in report["towers"].get(tower, {}).get("rows", []):
                if row["config"] == "bf16-true" and "error" not in row:
                    base[run] = row
        any_base = next(iter(base.values()))
        for run, report in runs.items():
            for r in report["towers"].get(tower, {}).get("rows", []):
                if "error" in r or (run, r["config"]) in EXCLUDE:
                    continue
                b = base.get(run, any_base)
                print(
                    f"| {r['config']} | {run} | {r['images_per_s']:,.0f} "
                    f"| {r['images_per_s'] / b['images_per_s']:.2f} "
                    f"| {r['texts_per_s']:,.0f} | {r['texts_per_s'] / b['texts_per_s']:.2f} "
                    f"| {r['image_cos_mean']:.5f} ({r['image_cos_min']:.5f}) "
                    f"| {r['text_cos_mean']:.5f} ({r['text_cos_min']:.5f}) | {r['top1_agreement']:.3f} "
                    f"| {r['peak_memory_mb']:,.0f} | {r['warmup_s']:.1f} |"
                )
    for run, report in runs.items():
        for tower, entry in report["towers"].items():
            if entry.get("gemms"):
                print(f"\n### GEMMs of one {tower} block, batch 256 (run {run})\n")
                print(
                    "| GEMM | m x k x n | bf16 ms (TFLOP/s) | FP8 per-tensor ms (TFLOP/s) | FP8 per-row ms "
                    "(TFLOP/s) | cast bf16->FP8 of A, ms |"
                )
                print("|---|---|---|---|---|---|")
                by = {}
                for g in entry["gemms"]:
                    by.setdefault(g["gemm"], {})[g["case"]] = g
                for name, cases in by.items():
                    b, t, r, c = (
                        cases[k] for k in ("bf16", "fp8_tensor_fast", "fp8_row_fast", "cast_bf16_to_fp8")
                    )
                    print(
                        f"| {name} | {b['m']} x {b['k']} x {b['n']} | {b['ms']:.2f} ({b['tflops']:.0f}) "
                        f"| {t['ms']:.2f} ({t['tflops']:.0f}) | {r['ms']:.2f} ({r['tflops']:.0f}) "
                        f"| {c['ms']:.2f} |"
                    )
            if entry.get("profiles"):
                print(f"\n### Kernel time of one ViT-bigG-14 image batch of 256, ms (run {run})\n")
                profiles = entry["profiles"]
                names = [k for k, _ in KINDS] + ["other"]
                print("| kind | " + " | ".join(p["config"] for p in profiles) + " |")
                print("|---|" + "---|" * len(profiles))
                sums = []
                for p in profiles:
                    s: dict[str, float] = {}
                    for name, _count, ms in p["kernels"]:
                        s[kind(name)] = s.get(kind(name), 0.0) + ms
                    sums.append(s)
                for n in names:
                    if any(s.get(n, 0) > 0.05 for s in sums):
                        print(f"| {n} | " + " | ".join(f"{s.get(n, 0):.1f}" for s in sums) + " |")
                print("| **all kernels** | " + " | ".join(f"**{sum(s.values()):.1f}**" for s in sums) + " |")
                print("| wall, one batch | " + " | ".join(f"{p['wall_ms']:.1f}" for p in profiles) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "raw"))
