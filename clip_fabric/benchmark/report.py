"""The report: ratios between its measurements, the JSON file (rewritten after each measurement),
Markdown tables and a PNG bar chart."""

from __future__ import annotations

import json
import time
from pathlib import Path


def save(report: dict, output: Path, chart: Path, started: float, final: bool) -> None:
    """Write the report and the chart; also after each measurement (``complete: false``), so that a run
    cut short still leaves what it measured."""
    add_ratios(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["complete"] = final
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(output)
    draw_chart(report, chart)


def add_ratios(report: dict) -> None:
    """Per end-to-end row: against the naive loop (same model and images; one device; tar shards),
    against the model alone (times the devices), and the scaling efficiency against the smallest device
    count. Per defaults row: against the best tuned run on the same images."""
    naive = {(r["model"], r["image_size"]): r.get("images_per_s") for r in report["naive"]}
    model_only = {(r["model"], r["precision"]): r.get("images_per_s") for r in report["model_only"]}
    rows = report["end_to_end"]
    for row in rows:
        rate = row.get("images_per_s")
        base = naive.get((row["model"], row["image_size"])) if row.get("input") != "folder" else None
        row["vs_naive"] = round(rate / base, 3) if rate and base and row["devices"] == 1 else None
        alone = model_only.get((row["model"], row["precision"]))
        row["of_model_only"] = round(rate / (alone * row["devices"]), 3) if rate and alone else None
        same = [
            r
            for r in rows
            if r.get("images_per_s")
            and all(r.get(k) == row.get(k) for k in ("model", "input", "precision", "image_size", "decode"))
        ]
        smallest = min(same, key=lambda r: r["devices"], default=None)
        row["scaling_efficiency"] = (
            round(rate / (smallest["images_per_s"] * row["devices"] / smallest["devices"]), 3)
            if rate and smallest and len({r["devices"] for r in same}) > 1
            else None
        )
    for row in report.get("defaults", []):
        tuned = best_tuned(report, row["model"], row["input"], row["image_size"], row["devices"])
        rate = row.get("images_per_s")
        measured = bool(rate and tuned)
        row |= {
            "tuned_images_per_s": tuned["images_per_s"] if tuned else None,
            "tuned_precision": tuned["precision"] if tuned else None,
            "tuned_decode": _e2e_decode(tuned) if tuned else None,
            "of_tuned": round(rate / tuned["images_per_s"], 3) if measured else None,
            # On the same images, the ratio of process times: start-up and model loading included.
            "of_tuned_wall": (
                round(tuned["wall_s"] / row["wall_s"], 3)
                if measured and tuned["images"] == row["images"]
                else None
            ),
        }


def best_tuned(report: dict, model: str, input_kind: str, image_size: str, devices: int) -> dict | None:
    """The fastest tuned end-to-end run of a model on a data set and device count (any precision and
    decode mode), or None if none ran."""
    rows = [
        r
        for r in report["end_to_end"]
        if r.get("images_per_s")
        and (r["model"], r.get("input", "webdataset"), r["image_size"], r["devices"])
        == (model, input_kind, image_size, devices)
    ]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def row_line(row: dict) -> str:
    """One measurement on one line, as printed when it is done."""
    keys = ("model", "options", "precision", "image_size", "decode")
    where = " ".join(str(row[k]) for k in keys if row.get(k) is not None)
    if row.get("input") == "folder":
        where += " folder"
    if row.get("devices"):
        where += f" x{row['devices']}"
    if row.get("images_per_s"):
        return f"{where}: {row['images_per_s']:,.0f} images/s"
    return f"{where}: failed: {row.get('error')}"


def _e2e_decode(row: dict) -> str:
    return row.get("decode_used") or row.get("decode") or "default"


# (header, value of a row, format) of each table.
MODEL_ONLY_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("precision", lambda r: r["precision"], "{}"),
    ("batch", lambda r: r.get("batch_size"), "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("batch ms", lambda r: r.get("batch_latency_ms"), "{:.1f}"),
    ("peak GB", lambda r: r.get("peak_memory_gb"), "{:.2f}"),
    ("error", lambda r: r.get("error"), "{}"),
)
E2E_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("precision", lambda r: r["precision"], "{}"),
    ("input", lambda r: r.get("input"), "{}"),
    ("image size", lambda r: r["image_size"], "{}"),
    ("images", lambda r: r.get("images"), "{:,}"),
    ("decode", _e2e_decode, "{}"),
    ("CPU share", lambda r: r.get("cpu_decode_share_used"), "{:.0%}"),
    ("devices", lambda r: r["devices"], "{}"),
    ("workers/rank", lambda r: r["num_workers"], "{}"),
    ("batch", lambda r: r.get("batch_size_used") or r.get("batch_size"), "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("x naive", lambda r: r.get("vs_naive"), "{:.1f}"),
    ("of model only", lambda r: r.get("of_model_only"), "{:.0%}"),
    ("scaling eff.", lambda r: r.get("scaling_efficiency"), "{:.0%}"),
    ("batch ms p50", lambda r: (r.get("batch_latency_ms") or {}).get("p50"), "{:.1f}"),
    ("peak GB", lambda r: r.get("peak_memory_gb"), "{:.2f}"),
    ("GPU util %", lambda r: r.get("gpu_util_active_mean"), "{:.0f}"),
    ("error", lambda r: r.get("error"), "{}"),
)
DEFAULTS_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("input", lambda r: r["input"], "{}"),
    ("image size", lambda r: r["image_size"], "{}"),
    ("images", lambda r: r.get("images"), "{:,}"),
    ("devices", lambda r: r["devices"], "{}"),
    ("precision", lambda r: r.get("precision_used"), "{}"),
    ("workers/rank", lambda r: r.get("num_workers_used"), "{}"),
    ("batch", lambda r: r.get("batch_size_used"), "{}"),
    ("decode", lambda r: r.get("decode_used"), "{}"),
    ("CPU share", lambda r: r.get("cpu_decode_share_used"), "{:.0%}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("tuned images/s", lambda r: r.get("tuned_images_per_s"), "{:,.0f}"),
    ("of tuned", lambda r: r.get("of_tuned"), "{:.0%}"),
    ("wall s", lambda r: r.get("wall_s"), "{:.1f}"),
    ("of tuned (wall)", lambda r: r.get("of_tuned_wall"), "{:.0%}"),
    ("error", lambda r: r.get("error"), "{}"),
)
DATA_PATH_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("image size", lambda r: r["image_size"], "{}"),
    ("images", lambda r: r.get("images"), "{:,}"),
    ("decode", lambda r: r.get("decode_used") or r.get("decode"), "{}"),
    ("JPEG library", lambda r: r.get("jpeg_library"), "{}"),
    ("workers", lambda r: r.get("num_workers_used"), "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("error", lambda r: r.get("error"), "{}"),
)
NAIVE_COLUMNS = (
    ("model", lambda r: r["model"], "{}"),
    ("image size", lambda r: r["image_size"], "{}"),
    ("images", lambda r: r.get("images"), "{:,}"),
    ("batch", lambda r: r["batch_size"], "{}"),
    ("workers", lambda r: r["num_workers"], "{}"),
    ("images/s", lambda r: r.get("images_per_s"), "{:,.0f}"),
    ("GPU util %", lambda r: r.get("gpu_util_active_mean"), "{:.0f}"),
    ("error", lambda r: r.get("error"), "{}"),
)


def _table(title: str, columns: tuple, rows: list[dict]) -> list[str]:
    lines = ["", title, "", "| " + " | ".join(c for c, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, value, fmt in columns:
            v = value(row)
            cells.append("" if v is None else fmt.format(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_tables(report: dict) -> str:
    """The report as Markdown tables: model only, end to end, predict's defaults, naive."""
    machine = report.get("machine", {})
    lines = [
        f"{machine.get('device', '?')} x{machine.get('cuda_devices', 0)}, {machine.get('cpu_count')} CPUs; "
        + report["weights"].split(":")[0]
    ]
    lines += _table("Model only (synthetic tensors on the device)", MODEL_ONLY_COLUMNS, report["model_only"])
    lines += _table(
        "End to end (predict: JPEG shards -> embeddings on disk)", E2E_COLUMNS, report["end_to_end"]
    )
    if report.get("data_path"):
        title = "Data path alone (predict's loader and device stage, no model, one device)"
        lines += _table(title, DATA_PATH_COLUMNS, report["data_path"])
    if report.get("defaults"):
        title = "Predict with its defaults (no performance options) against the best tuned run"
        lines += _table(title, DEFAULTS_COLUMNS, report["defaults"])
    if report["naive"]:
        title = "Naive baseline (webdataset + PIL preprocess in DataLoader workers, float32, one device)"
        lines += _table(title, NAIVE_COLUMNS, report["naive"])
    return "\n".join(lines)


COLOURS = {
    "model only": (66, 113, 196),
    "end to end": (46, 160, 90),
    "defaults": (240, 170, 40),
    "naive": (214, 80, 64),
}


def _input(row: dict) -> str:
    return " folder" if row.get("input") == "folder" else ""


# Chart layout, in pixels: a bar's row, the space above the first bar, the left margin, and the room to
# the right of the longest bar for its figure.
ROW_H, TOP, LEFT, RIGHT = 26, 70, 20, 230


def draw_chart(report: dict, path: Path) -> None:
    """A labelled horizontal bar chart of images/s per measurement (PIL only)."""
    from PIL import Image, ImageDraw

    bars = _chart_bars(report)
    font, title_font = _chart_fonts()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max([probe.textlength(label, font=font) for _, label, _ in bars] or [100])) + 16
    width = max(1000, label_w + 600)
    height = TOP + ROW_H * max(len(bars), 1) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    machine = report.get("machine", {})
    title = f"clip_fabric benchmark: images/s on {machine.get('device', '?')}"
    draw.text((LEFT, 12), title, fill="black", font=title_font)
    draw.text((LEFT, 38), report["weights"].split(":")[0], fill=(90, 90, 90), font=font)
    rates = [r.get("images_per_s") or 0 for _, _, r in bars]
    scale = (width - LEFT - label_w - RIGHT) / max(max(rates, default=0), 1)
    for i, (kind, label, row) in enumerate(bars):
        _draw_bar(draw, TOP + i * ROW_H, LEFT + label_w, scale, COLOURS[kind], label, row, font)
    _draw_legend(draw, probe, height, font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _chart_bars(report: dict) -> list[tuple[str, str, dict]]:
    """(kind, label, row) of every bar, each model's bars together in the report's order."""
    bars = [("model only", f"{r['model']} {r['precision']} model only", r) for r in report["model_only"]]
    bars += [
        (
            "end to end",
            f"{r['model']} {r['precision']} {r['image_size']}{_input(r)} decode {_e2e_decode(r)}, "
            f"{r['devices']} dev",
            r,
        )
        for r in report["end_to_end"]
    ]
    bars += [
        ("defaults", f"{r['model']} defaults {r['image_size']}{_input(r)}, {r['devices']} dev", r)
        for r in report.get("defaults", [])
    ]
    bars += [("naive", f"{r['model']} fp32 {r['image_size']} naive", r) for r in report["naive"]]
    order = list(dict.fromkeys(row["model"] for _, _, row in bars))
    bars.sort(key=lambda bar: order.index(bar[2]["model"]))  # stable: each kind keeps its order
    return bars


def _chart_fonts() -> tuple:
    """(label font, title font): Pillow's scalable default font, else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=15), ImageFont.load_default(size=18)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        font = ImageFont.load_default()
        return font, font


def _draw_bar(draw, y: int, x0: int, scale: float, colour: tuple, label: str, row: dict, font) -> None:
    """One measurement's label, bar and figure (with its ratio), or "failed"."""
    draw.text((LEFT, y + 4), label, fill="black", font=font)
    rate = row.get("images_per_s")
    if not rate:
        draw.text((x0, y + 4), "failed", fill=(200, 0, 0), font=font)
        return
    draw.rectangle((x0, y + 3, x0 + max(int(rate * scale), 1), y + ROW_H - 4), fill=colour)
    draw.text((x0 + int(rate * scale) + 6, y + 4), f"{rate:,.0f}" + _bar_ratio(row), fill="black", font=font)


def _bar_ratio(row: dict) -> str:
    """The one ratio a bar shows beside its figure: against the naive loop, the best tuned run or
    linear scaling, the first that the row has."""
    if row.get("vs_naive"):
        return f"  ({row['vs_naive']:.1f}x naive)"
    if row.get("of_tuned"):
        return f"  ({row['of_tuned']:.0%} of tuned)"
    if row.get("scaling_efficiency") and row.get("devices", 1) > 1:
        return f"  ({row['scaling_efficiency']:.0%} of linear scaling)"
    return ""


def _draw_legend(draw, probe, height: int, font) -> None:
    x = LEFT
    for kind, colour in COLOURS.items():
        draw.rectangle((x, height - 32, x + 16, height - 16), fill=colour)
        draw.text((x + 22, height - 34), kind, fill="black", font=font)
        x += int(probe.textlength(kind, font=font)) + 60
