"""Compare predict output folders row by row, and read their throughput, for run.sh (issue 8).

    python compare.py rows REF NAME=DIR [NAME=DIR ...] [--min_cos C] [--max_sim_diff D] [--json FILE]
    python compare.py speed NAME=DIR [NAME=DIR ...] [--json FILE]

``rows``: each run must have the reference's keys in the same order (shard by shard), and its embeddings
(``img_emb``, ``text_emb``, where both folders have them) and pair similarities (``metadata``
``similarity``, where both have it) must agree: the minimum cosine of each row with the reference's row,
and the largest absolute difference of similarity. ``speed``: ``this_run`` of each ``summary.json``.
Results are merged into ``--json FILE`` (a dict with the lists ``rows`` and ``speed``). The exit status
is 1 when a compared run is missing or disagrees; only numpy and pyarrow are needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

TOWERS = ("img_emb", "text_emb")


def load(out_dir: Path) -> dict:
    """Keys, similarities and embeddings of every written shard, in shard order."""
    metas = sorted((out_dir / "metadata").glob("metadata_*.parquet"))
    if not metas:
        raise FileNotFoundError(f"{out_dir}: no metadata/*.parquet (did the run finish?)")
    keys, sims, towers = [], [], {t: [] for t in TOWERS}
    for meta in metas:
        name = meta.stem.split("_")[-1]
        table = pq.read_table(meta)
        keys += table.column("key").to_pylist()
        if "similarity" in table.column_names:
            sims.append(table.column("similarity").to_numpy())
        for tower in TOWERS:
            npy = out_dir / tower / f"{tower}_{name}.npy"
            if npy.is_file():
                towers[tower].append(np.load(npy).astype(np.float32))
    result = {"keys": keys, "similarity": np.concatenate(sims) if len(sims) == len(metas) else None}
    for tower, arrays in towers.items():
        result[tower] = np.concatenate(arrays) if arrays and len(arrays) == len(metas) else None
    return result


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    dots = (a * b).sum(1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((dots / np.maximum(norms, 1e-12)).min())


def compare_rows(ref_dir: Path, name: str, run_dir: Path, min_cos: float, max_sim_diff: float) -> dict:
    record = {"run": name, "dir": str(run_dir), "ref": str(ref_dir)}
    try:
        ref, run = load(ref_dir), load(run_dir)
    except (FileNotFoundError, OSError, ValueError) as error:
        return record | {"ok": False, "error": str(error)}
    record |= {
        "rows": len(run["keys"]),
        "ref_rows": len(ref["keys"]),
        "unique_keys": len(set(run["keys"])) == len(run["keys"]),
        "same_keys_in_order": run["keys"] == ref["keys"],
    }
    ok = record["same_keys_in_order"] and record["unique_keys"] and record["rows"] > 0
    if record["same_keys_in_order"]:
        for tower in TOWERS:
            if ref[tower] is not None and run[tower] is not None:
                record[f"min_cos_{tower}"] = round(min_cosine(ref[tower], run[tower]), 8)
                ok &= record[f"min_cos_{tower}"] >= min_cos
        if ref["similarity"] is not None and run["similarity"] is not None:
            diff = float(np.abs(ref["similarity"].astype(np.float64) - run["similarity"]).max())
            record["max_abs_sim_diff"] = round(diff, 8)
            ok &= diff <= max_sim_diff
        compared = [k for k in record if k.startswith(("min_cos", "max_abs"))]
        ok &= bool(compared)  # nothing in common to compare is not agreement
    record["ok"] = bool(ok)
    return record


def speed(name: str, run_dir: Path) -> dict:
    record = {"run": name, "dir": str(run_dir)}
    path = run_dir / "summary.json"
    if not path.is_file():
        return record | {"ok": False, "error": f"no {path}"}
    summary = json.loads(path.read_text())
    config = summary.get("config", {})
    return record | {
        "ok": summary.get("shards_done") == summary.get("shards_total") and summary.get("errors") == 0,
        "strategy": config.get("strategy"),
        "devices": config.get("devices"),
        "mode": config.get("mode"),
        "precision": config.get("precision"),
        "model": (config.get("model") or {}).get("name"),
        "num_workers": (config.get("data") or {}).get("num_workers"),
        **summary.get("this_run", {}),
    }


def named(items: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        pairs.append((name, Path(path)) if sep else (Path(item).name, Path(item)))
    return pairs


def merge_json(path: Path | None, key: str, records: list[dict]) -> None:
    if path is None:
        return
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(key, []).extend(records)
    path.write_text(json.dumps(data, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rows = sub.add_parser("rows")
    rows.add_argument("ref", type=Path)
    rows.add_argument("runs", nargs="+")
    rows.add_argument("--min_cos", type=float, default=0.9999)
    rows.add_argument("--max_sim_diff", type=float, default=1e-4)
    rows.add_argument("--json", type=Path)
    spd = sub.add_parser("speed")
    spd.add_argument("runs", nargs="+")
    spd.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    if args.command == "rows":
        records = [compare_rows(args.ref, n, d, args.min_cos, args.max_sim_diff) for n, d in named(args.runs)]
        for r in records:
            numbers = " ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("min_cos", "max_abs")))
            detail = r.get("error") or (
                f"rows={r['rows']}/{r['ref_rows']} same_keys={r['same_keys_in_order']} {numbers}"
            )
            print(f"rows  {'OK  ' if r['ok'] else 'FAIL'} {r['run']:<22} vs {args.ref.name}: {detail}")
    else:
        records = [speed(n, d) for n, d in named(args.runs)]
        for r in records:
            detail = r.get("error") or (
                f"{r.get('samples_per_s')} samples/s ({r.get('rows')} rows in {r.get('seconds')} s, "
                f"{r.get('world_size')} rank(s), batch {r.get('batch_size')}, decode {r.get('decode')}, "
                f"workers {r.get('num_workers')}, peak {r.get('peak_memory_gb')} GB)"
            )
            print(f"speed {'OK  ' if r['ok'] else 'FAIL'} {r['run']:<22} {detail}")
    merge_json(args.json, args.command, records)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
