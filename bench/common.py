"""Shared plumbing for benchmark commands: machine description, result files (JSON + Markdown), printing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


SOURCE_DIRS = ("flowpolicy", "agents", "envs", "bench", "configs")
SOURCE_SUFFIXES = (".py", ".yaml")


def _source_hash(root: Path, files) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f).encode() + b"\0" + (root / f).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def code_version(root: Path | None = None) -> str:
    """What a saved run is keyed by, so that it is reused only by the same code: the commit, plus a hash of
    uncommitted changes to tracked files and of untracked source files; outside a git checkout (an unpacked
    copy, a wheel), a hash of every source file (.py, .yaml) of the project's packages and train.py."""
    import hashlib
    import subprocess

    root = Path(root or Path(__file__).resolve().parents[1])
    try:
        def git(*args) -> bytes:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout

        head = git("rev-parse", "HEAD").decode().strip()
        diff = git("diff", "HEAD", "--", ".", ":(exclude)bench/results", ":(exclude)*.md")
        untracked = [f for f in git("ls-files", "--others", "--exclude-standard").decode().splitlines()
                     if f.endswith(SOURCE_SUFFIXES) and not f.startswith("bench/results")]
    except (OSError, subprocess.CalledProcessError):
        files = [f.relative_to(root) for d in SOURCE_DIRS for f in (root / d).rglob("*")
                 if f.suffix in SOURCE_SUFFIXES and f.is_file() and "results" not in f.relative_to(root).parts]
        files += [Path("train.py")] if (root / "train.py").is_file() else []
        return "files:" + _source_hash(root, files)
    extra = diff + (_source_hash(root, untracked).encode() if untracked else b"")
    return head + ("+" + hashlib.sha256(extra).hexdigest()[:12] if extra else "")


def write_json_atomic(path: Path, obj) -> Path:
    """``obj`` as JSON at ``path`` (creating its folder), written to a temporary file first: a process killed
    while writing leaves the old file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, default=float))
    os.replace(tmp, path)
    return path


def check_out_dir(path, option: str = "--out") -> Path:
    """``path`` as a results folder, refused in one line when it, or a folder above it, is an existing file:
    checked before anything runs, so that the results of a long run are not lost when they cannot be written."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise SystemExit(f"error: {option} {path}: {'it' if q == p else q} is a file, not a folder")
            break
    return p


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def load_result(path, option: str, module: str, is_ours, required: tuple[str, ...] = ("config", "rows")) -> dict:
    """The result JSON at ``path`` given by ``option`` (``--merge``, ``--add-peer-table``), refused in one line
    when it is missing, not JSON, or not a result of ``module`` (``is_ours(record)`` false, e.g. its "name" is
    another benchmark's, or one of ``required`` keys missing): a wrong file must not fail in a traceback, or
    after the run."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: {option} {path}: " + ("not a file" if p.exists() else "no such file"))
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError (a binary file)
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: {option} {path}: not a JSON file ({why})") from None
    if isinstance(rec, dict) and is_ours(rec) and all(k in rec for k in required):
        return rec
    if not isinstance(rec, dict):
        what = f"it holds {_JSON_KINDS.get(type(rec), type(rec).__name__)}"
    elif not isinstance(rec.get("name"), str):
        what = "it has no \"name\""
    elif not is_ours(rec):
        what = f"its name is {rec['name']!r}"
    else:
        what = f"it has no {[k for k in required if k not in rec]}"
    raise SystemExit(f"error: {option} {path}: not a {module} result ({what})")


def check_not_written(path, outputs, option: str = "--merge") -> None:
    """Refuse an input file (``--merge``) that is one of the files this run writes (``outputs``): the run would
    replace it, and the earlier results it merges would be lost if this run fails or is stopped."""
    if any(Path(o).resolve() == Path(path).resolve() for o in outputs):
        raise SystemExit(f"error: {option} {path} is the file this run would write: pass another --out, so that "
                         "the merged run stays as it is")


def is_module_result(rec: dict, module: str) -> bool:
    """Whether ``rec`` was written by ``python -m <module>`` (its recorded command)."""
    return isinstance(rec.get("name"), str) and str(rec.get("command", "")).split()[2:3] == [module]


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - torch is optional for this description
        pass
    try:
        import torch

        tv = f", torch {torch.__version__}"
    except Exception:  # noqa: BLE001
        tv = ""
    return f"{platform.node()} ({os.cpu_count()} CPUs, {cpu}{gpu}), Python {platform.python_version()}{tv}"


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = ".3f") -> str:
    """Rows of dicts -> a GitHub Markdown table over ``columns``."""

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_results(name: str, rows: list[dict], columns: list[str], config: dict, wall_s: float,
                 extra_md: str = "", out_dir: Path | None = None, module: str | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under bench/results (or ``out_dir``) and print the table."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "command": "python -m " + " ".join([module or f"bench.{name}"] + sys.argv[1:]),
        "machine": machine(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 1),
        "config": config,
        "rows": rows,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    table = markdown_table(rows, columns)
    md = (f"# {name}\n\n`{record['command']}` on {record['machine']}, {record['date']}, "
          f"wall time {record['wall_s']} s.\n\n{table}\n{extra_md}")
    (out / f"{name}.md").write_text(md)
    print(md)
    return out / f"{name}.json"


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Tight layout, write the PNG (creating its folder) and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
