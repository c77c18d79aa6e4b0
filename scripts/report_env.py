"""Where a comparison script's report was made: the repository root, paths relative to it, the machine and the
package versions. Shared by bench_reference.py, compare_quanto.py and sweep_python_vs_segq.py (run as scripts, so
this folder is on the import path)."""

import importlib.metadata as md
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def rel(path):
    """`path` relative to the repository root when it lies inside it (reports name no home folders)."""
    p = os.path.relpath(os.path.abspath(path), ROOT)
    return path if p.startswith("..") else p


def command_line():
    """This script's command line as a report shows it: `python scripts/NAME.py ARGS`, run from the root."""
    return " ".join(shlex.quote(a) for a in ["python", rel(sys.argv[0])] + sys.argv[1:])


def machine_info():
    """CPU model and core layout, from lscpu when it runs."""
    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        kv = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
        model = kv.get("Model name", model)
        cores = f"{kv.get('CPU(s)', cores)} CPUs, {kv.get('Core(s) per socket', '?')} cores/socket x " \
                f"{kv.get('Socket(s)', '?')} socket(s), {kv.get('Thread(s) per core', '?')} thread(s)/core"
    except Exception:
        cores = f"{cores} logical CPUs"
    return f"{model}; {cores}"


def package_versions(packages):
    """"python X, torch Y, ..." for this interpreter, naming the packages that are not installed."""
    v = ["python " + platform.python_version()]
    for p in packages:
        try:
            v.append(p + " " + md.version(p))
        except md.PackageNotFoundError:
            v.append(p + " missing")
    return ", ".join(v)
