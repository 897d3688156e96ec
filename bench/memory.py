"""Memory: what Flywheel's model server and `mlflow models serve` hold resident, serving the same model.

Each server is a process tree (`mlflow models serve` runs uvicorn in a child process): its memory is the sum over
the tree, as PSS (shared pages split between the processes sharing them) and RSS. Read from /proc (Linux), after
start and again after a short load of single rows and one 10,000-row batch.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import BenchResult, ratio

TITLE = "resident memory of Flywheel's model server vs mlflow models serve"
PROC = Path("/proc")


def parse_ppid(stat: str) -> int:
    """The parent pid from a /proc/<pid>/stat line (the command name may hold spaces and parentheses)."""
    return int(stat.rsplit(")", 1)[1].split()[1])


def parse_kb(text: str, keys: tuple[str, ...] = ("Rss", "Pss")) -> dict[str, int]:
    """`Key:   123 kB` lines (smaps_rollup, status) → {key: kB} for the keys asked."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() in keys:
            out[key.strip()] = int(rest.split()[0])
    return out


def process_tree(root_pid: int) -> list[int]:
    """root_pid and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = parse_ppid((entry / "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_memory_mb(root_pid: int) -> dict[str, float]:
    """{"rss": MB, "pss": MB, "processes": n} summed over the tree."""
    rss = pss = 0
    n = 0
    for pid in process_tree(root_pid):
        try:
            values = parse_kb((PROC / str(pid) / "smaps_rollup").read_text())
        except OSError:
            try:
                values = parse_kb((PROC / str(pid) / "status").read_text(), ("VmRSS",))
                values = {"Rss": values.get("VmRSS", 0), "Pss": values.get("VmRSS", 0)}
            except OSError:
                continue
        rss += values.get("Rss", 0)
        pss += values.get("Pss", 0)
        n += 1
    return {"rss": rss / 1024, "pss": pss / 1024, "processes": n}


def run(quick: bool, root: Path) -> BenchResult:
    from bench import serving_load
    from bench.serving_setup import served_model

    res = BenchResult("memory", TITLE, quick)
    if not PROC.is_dir():
        res.errors.append("no /proc on this system: memory is read from Linux's /proc")
        return res
    labels = ("mlflow serve", "flywheel")
    with served_model(root, quick=True) as served:
        idle = {label: tree_memory_mb(served.servers[label].pid) for label in labels}
        for label in labels:
            serving_load.sequential(served.url(label), served.feed, 2.0 if quick else 5.0)
            serving_load.concurrent(served.url(label), served.feed, 8, 2.0 if quick else 5.0)
            serving_load.batch(served.url(label), served.feed)
        loaded = {label: tree_memory_mb(served.servers[label].pid) for label in labels}
    for label in labels:
        res.add(f"{label}: PSS after start", idle[label]["pss"], "MB", note=f"{idle[label]['processes']} processes")
        res.add(f"{label}: PSS after load", loaded[label]["pss"], "MB")
        res.add(f"{label}: RSS after load", loaded[label]["rss"], "MB", "info")
    res.add(
        "PSS after load: flywheel / mlflow serve", ratio(loaded["flywheel"]["pss"], loaded["mlflow serve"]["pss"]), "×"
    )
    res.notes.append("Flywheel's server holds two slots (active + standby) but loads the standby only on a deployment.")
    return res
