#!/usr/bin/env python3
"""Checks a W&B offline run folder written by segq with the installed `wandb` package's own code.

Usage: check_wandb_offline.py RUN_DIR [--config-keys a,b] [--history-keys a,b] [--summary-keys a,b]

Two readers must accept the folder's run-<id>.wandb:
  1. wandb-core (Go), through `wandb leet inspect --json` (wandb >= 0.31): prints every record it decodes and
     reports "skipped corrupt data" on stderr for a bad CRC or framing;
  2. wandb's generated protobuf classes (`wandb.proto.wandb_internal_pb2.Record.ParseFromString`), fed by a
     framing reader written here from the format's description (header, 32 KiB blocks, CRC-32 chunks).
Then the content is checked: run id, config keys, history steps and keys, summary, files present, exit record.
Exits 0 when everything holds, 1 with one line per problem otherwise.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

BLOCK = 32 * 1024
HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"


def read_payloads(data):
    """Yields record payloads; raises ValueError naming the offset of any framing or CRC problem."""
    if data[:7] != HEADER:
        raise ValueError("bad file header %r" % data[:7])
    pos, pending = 7, None
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            if any(data[pos:pos + left]):
                raise ValueError("offset %d: non-zero block tail" % pos)
            pos += left
            continue
        if len(data) - pos < 7:
            raise ValueError("offset %d: truncated chunk header" % pos)
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        if length > left - 7 or len(payload) != length:
            raise ValueError("offset %d: chunk overruns its block or the file" % pos)
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError("offset %d: CRC mismatch" % pos)
        if kind == 1 and pending is None:
            yield payload
        elif kind == 2 and pending is None:
            pending = bytearray(payload)
        elif kind == 3 and pending is not None:
            pending += payload
        elif kind == 4 and pending is not None:
            pending += payload
            yield bytes(pending)
            pending = None
        else:
            raise ValueError("offset %d: unexpected chunk type %d" % (pos, kind))
        pos += 7 + length
    if pending is not None:
        raise ValueError("file ends inside a split record")


def leet_records(wandb_file, problems):
    """Records as wandb-core decodes them, or None when this wandb has no `leet inspect`."""
    exe = shutil.which("wandb", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        return None
    probe = subprocess.run([exe, "leet", "inspect", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    done = subprocess.run([exe, "leet", "inspect", "--json", wandb_file], capture_output=True, text=True)
    if done.returncode != 0:
        problems.append("wandb leet inspect exited %d: %s" % (done.returncode, done.stderr.strip()[:300]))
        return []
    if "corrupt" in done.stderr.lower() or "error" in done.stderr.lower():
        problems.append("wandb leet inspect: %s" % done.stderr.strip()[:300])
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--config-keys", default="")
    parser.add_argument("--history-keys", default="")
    parser.add_argument("--summary-keys", default="")
    args = parser.parse_args()

    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = os.path.abspath(args.run_dir)
    folder = os.path.basename(run_dir.rstrip("/"))
    problems = []
    if not folder.startswith("offline-run-"):
        problems.append("%s: folder name must start with offline-run- for wandb sync" % folder)
    run_id = folder.rsplit("-", 1)[-1]
    wandb_file = os.path.join(run_dir, "run-%s.wandb" % run_id)
    with open(wandb_file, "rb") as f:
        data = f.read()

    records = []
    try:
        for payload in read_payloads(data):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
    except Exception as err:  # a protobuf DecodeError or our framing ValueError
        problems.append("%s: %s" % (wandb_file, err))

    kinds = [r.WhichOneof("record_type") for r in records]
    counts = {k: kinds.count(k) for k in set(kinds)}
    runs = [r.run for r in records if r.HasField("run")]
    if len(runs) != 1:
        problems.append("expected 1 run record, found %d" % len(runs))
    elif runs[0].run_id != run_id:
        problems.append("run record id %r differs from folder id %r" % (runs[0].run_id, run_id))
    elif not runs[0].project or not runs[0].start_time.seconds:
        problems.append("run record lacks project or start_time")

    config = {}
    for r in records:
        if r.HasField("config"):
            for item in r.config.update:
                config[item.key] = json.loads(item.value_json)
    history = [
        {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records if r.HasField("history")
    ]
    summary = {}
    for r in records:
        if r.HasField("summary"):
            for item in r.summary.update:
                summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    files = [item.path for r in records if r.HasField("files") for item in r.files.files]
    exits = [r.exit for r in records if r.HasField("exit")]

    if not history:
        problems.append("no history records")
    for i, row in enumerate(history):
        if row.get("_step") != i or "_timestamp" not in row or "_runtime" not in row:
            problems.append("history row %d lacks _step=%d, _timestamp or _runtime" % (i, i))
    wanted = [
        ("config", config, args.config_keys),
        ("history", {k: 1 for row in history for k in row}, args.history_keys),
        ("summary", summary, args.summary_keys),
    ]
    for what, present, keys in wanted:
        for key in filter(None, keys.split(",")):
            if key not in present:
                problems.append("%s lacks key %r (has %s)" % (what, key, sorted(present)[:20]))
    if not summary:
        problems.append("no summary record")
    for path in files:
        if not os.path.isfile(os.path.join(run_dir, "files", path)):
            problems.append("files record names %s, missing under files/" % path)
    for row in history:
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") in ("image-file", "table-file"):
                refs = [value["path"]] + [m["path"] for m in value.get("masks", {}).values()]
                problems.extend("%s refers to %s, not in a files record" % (key, p) for p in refs if p not in files)
    if len(exits) != 1 or kinds[-1:] != ["exit"]:
        problems.append("expected exactly one exit record, last")

    leet = leet_records(wandb_file, problems)
    if leet is not None:
        leet_kinds = [r.get("type") for r in leet]
        if leet_kinds != kinds:
            problems.append("wandb leet inspect saw %s, protobuf reader saw %s" % (leet_kinds, kinds))

    if problems:
        for line in problems:
            print("FAIL " + line)
        return 1
    print("OK %s: %d records %s; config %d keys; %d history rows; summary %d keys; %d files; exit %d; "
          "wandb-core reader: %s" % (wandb_file, len(records), json.dumps(counts, sort_keys=True), len(config),
                                      len(history), len(summary), len(files), exits[0].exit_code,
                                      "agrees" if leet is not None else "not available"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
