"""Benchmark: preparation of synthetic logs of growing size, the local and Ray engines beside today's code.

    python benchmarks/prepare_scale.py --sizes 1000000 10000000 100000000 --legacy-max 10000000 \
        --work /tmp/prepare_scale --legacy-ref 349ba8a

For each size: ``jobs/synth_log.py`` writes a seeded log (Parquet, string ids, power-law users and
items, ties and duplicates; see :mod:`idle_ray.data.synthetic`) under ``--work``; then each engine
prepares it in its own process (``jobs/prepare.py --no-stream``), one at a time: wall time,
rows/s, CPU seconds (user + system: what the run cost, whatever else the machine ran), the peak
RSS of the process tree (sampled every 0.1 s, and the kernel's peak of the largest process), the
prepared folder's size; the job's log is kept as ``--work/prepare-<engine>-<rows>.log`` (the local
engine logs its peak RSS after each pass). ``ray`` starts a local Ray inside the job (all CPUs of the
machine); its processes (GCS, raylet, workers) are the job's descendants, so they are in the process
tree's RSS (the object store's shared pages can count once per process that maps them: an upper
bound) and in its CPU seconds (each descendant's last sampled CPU time, since Ray's workers are not
reaped by the job). ``legacy`` is ``jobs/prepare.py`` of the commit
``--legacy-ref`` (checked out once as a detached ``git worktree`` under ``--work``), run up to
``--legacy-max`` rows; where both ran, their prepared folders are compared file by file (and ``ray``'s
with ``local``'s). Data and
outputs are deleted after each size (``--keep`` keeps them).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (user + system) and peak RSS (GiB) of its process tree. CPU:
    the larger of the reaped children's rusage and the sum over every process seen in the tree of its
    last sampled user + system time (descendants that are not reaped, e.g. Ray's workers, count)."""
    import psutil

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak, cpu_seen = psutil.Process(proc.pid), 0, {}
    while proc.poll() is None:
        total = 0
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu_seen[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, total)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    # ru_maxrss (KiB) is the largest child so far: it tells only when this child set a new maximum
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    largest = usage.ru_maxrss
    return {"wall_s": wall, "cpu_s": max(usage.ru_utime + usage.ru_stime - cpu_before, sum(cpu_seen.values())),
            "peak_rss_gib": max(peak, largest * 1024 if largest > before else 0) / 2 ** 30, "output": out}


def prepared_folder(out_dir: Path) -> Path:
    entries = [p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def same_folder(a: Path, b: Path) -> bool:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    if files != sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def legacy_tree(work: Path, ref: str) -> Path:
    tree = work / f"legacy-{ref}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    return tree


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--engines", nargs="+", default=["legacy", "local"], choices=["local", "ray", "memory", "legacy"])
    p.add_argument("--legacy-max", type=int, default=10_000_000, help="run legacy only up to this many rows")
    p.add_argument("--legacy-ref", default="349ba8a", help="the commit whose jobs/prepare.py is 'legacy'")
    p.add_argument("--work", default="/tmp/prepare_scale", help="logs, outputs and the legacy checkout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep logs and prepared folders")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    rows = []
    try:
        for n in args.sizes:
            log = work / f"synth-{n}.parquet"
            t0 = time.perf_counter()
            if not log.exists():
                subprocess.run([python, str(ROOT / "jobs/synth_log.py"), "--interactions", str(n), "--out", str(log),
                                "--seed", str(args.seed)], check=True, capture_output=True)
            print(f"# {n:,} rows: log {log.stat().st_size / 2 ** 20:.0f} MiB written in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            folders = {}
            for engine in args.engines:
                if engine == "legacy" and n > args.legacy_max:
                    continue
                out = work / f"out-{engine}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                tree = legacy_tree(work, args.legacy_ref) if engine == "legacy" else ROOT
                cmd = [python, str(tree / "jobs/prepare.py"), "--no-stream", "--set", "data.dataset=parquet",
                       "--set", f"data.path={log}", "--set", f"data.output_dir={out}"]
                if engine != "legacy":
                    cmd += ["--set", f"data.engine={engine}"]
                r = run_measured(cmd, tree)
                (work / f"prepare-{engine}-{n}.log").write_text(r["output"])  # the job's per-pass peak RSS lines
                folders[engine] = prepared_folder(out)
                m = json.loads((folders[engine] / "manifest.json").read_text())
                row = {"interactions": n, "engine": engine, "wall_s": round(r["wall_s"], 1),
                       "rows_per_s": round(n / r["wall_s"]), "cpu_s": round(r["cpu_s"], 1),
                       "cpu_us_per_row": round(1e6 * r["cpu_s"] / n, 2), "peak_rss_gib": round(r["peak_rss_gib"], 2),
                       "output_mib": round(folder_bytes(folders[engine]) / 2 ** 20, 1),
                       "users": m["num_users"], "items": m["num_items"], "kept": m["stats"]["interactions"]}
                if engine != "legacy" and "legacy" in folders:
                    row["identical_to_legacy"] = same_folder(folders[engine], folders["legacy"])
                if engine == "ray" and "local" in folders:
                    row["identical_to_local"] = same_folder(folders[engine], folders["local"])
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not args.keep:
                for folder in folders.values():
                    shutil.rmtree(folder.parent, ignore_errors=True)
                log.unlink(missing_ok=True)
    finally:
        if not args.keep and (work / f"legacy-{args.legacy_ref}").is_dir():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(work / f"legacy-{args.legacy_ref}")], capture_output=True)
    print("\n| interactions | engine | wall (s) | rows/s | CPU (s) | CPU µs/row | peak RSS (GiB) | output (MiB) | "
          "identical to legacy | identical to local |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = [{True: "yes", False: "**no**"}.get(r.get(k), "") for k in ("identical_to_legacy", "identical_to_local")]
        print(f"| {r['interactions']:,} | {r['engine']} | {r['wall_s']:.1f} | {r['rows_per_s']:,} | {r['cpu_s']:.0f} | "
              f"{r['cpu_us_per_row']:.2f} | {r['peak_rss_gib']:.2f} | {r['output_mib']:.1f} | {same[0]} | {same[1]} |")


if __name__ == "__main__":
    main()
