#!/usr/bin/env python3
"""Checks a W&B offline run folder written by segq with the installed `wandb` package's own code.

Usage: check_wandb_offline.py RUN_DIR [--config-keys a,b] [--history-keys a,b] [--summary-keys a,b] [--sync]

Two readers must accept the folder's run-<id>.wandb:
  1. wandb-core (Go), through `wandb leet inspect --json` (wandb >= 0.31): prints every record it decodes and
     reports "skipped corrupt data" on stderr for a bad CRC or framing;
  2. wandb's generated protobuf classes (`wandb.proto.wandb_internal_pb2.Record.ParseFromString`), fed by a
     framing reader written here from the format's description (header, 32 KiB blocks, CRC-32 chunks).
Then the content is checked: run id, config keys, history steps and keys, summary, files present, exit record.
With --sync, `wandb sync` uploads a copy of the folder to a fake W&B server on a loopback port (no network, a
dummy key), and the requests it makes are checked: the run is created, every history row, the summary and every
media file arrive, and the run is marked complete with its exit code.
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


class FakeServer:
    """Just enough of W&B's API for `wandb sync`: GraphQL, file_stream and upload PUTs, all recorded."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_PUT(self):
                fake.requests.append(("PUT", self.path, self._body()))
                self._reply({})

            def do_GET(self):
                fake.requests.append(("GET", self.path, b""))
                self._reply({})

            def do_POST(self):
                body = self._body()
                try:
                    req = json.loads(body or b"{}")
                except ValueError:
                    req = {}
                fake.requests.append(("POST", self.path, req))
                if not self.path.startswith("/graphql"):
                    return self._reply({})
                query, var = req.get("query", ""), req.get("variables") or {}
                if "upsertBucket" in query:
                    project = {"id": "cA==", "name": var.get("project") or "segq",
                               "entity": {"id": "ZQ==", "name": var.get("entity") or "me"}}
                    return self._reply({"data": {"upsertBucket": {"inserted": True, "bucket": {
                        "id": "Yg==", "name": var.get("name"), "displayName": var.get("displayName"),
                        "description": None, "sweepName": None, "historyLineCount": 0, "project": project}}}})
                if "createRunFiles" in query:
                    port = self.server.server_address[1]
                    files = [{"name": f, "uploadUrl": "http://127.0.0.1:%d/upload/%s" % (port, f)}
                             for f in var.get("files", [])]
                    return self._reply({"data": {"createRunFiles": {"runID": "Yg==", "uploadHeaders": [],
                                                                    "files": files}}})
                if "serverInfo" in query:
                    return self._reply({"data": {"serverInfo": {"features": []}}})
                if "viewer" in query:
                    return self._reply({"data": {"viewer": {"id": "dg==", "entity": "me", "username": "me",
                                                            "flags": "{}", "teams": {"edges": []}}}})
                return self._reply({"data": {}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def check_sync(run_dir, run_id, history, summary, files, exit_code, problems):
    """Runs `wandb sync` on a copy of run_dir against a FakeServer and checks what it uploaded."""
    import tempfile

    exe = shutil.which("wandb", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        problems.append("--sync: no wandb executable next to %s" % sys.executable)
        return
    server = FakeServer()
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(run_dir))
        shutil.copytree(run_dir, copy)
        env = dict(os.environ, HOME=tmp, WANDB_BASE_URL=server.url, WANDB_API_KEY="0" * 40,
                   WANDB_CONFIG_DIR=os.path.join(tmp, "config"), NETRC=os.path.join(tmp, "netrc"))
        env.pop("WANDB_ENTITY", None)
        env.pop("WANDB_PROJECT", None)
        done = subprocess.run([exe, "sync", "--include-synced", copy], capture_output=True, text=True, env=env,
                              cwd=tmp, timeout=300)
    server.server.shutdown()
    if done.returncode != 0:
        problems.append("wandb sync exited %d: %s" % (done.returncode, (done.stdout + done.stderr).strip()[-400:]))
        return
    gql = [body for method, path, body in server.requests if method == "POST" and path.startswith("/graphql")]
    upserts = [b["variables"] for b in gql if "upsertBucket" in b.get("query", "")]
    if not any(v.get("name") == run_id for v in upserts):
        problems.append("sync: no UpsertBucket for run %s" % run_id)
    elif not any("config" in v and v["config"] for v in upserts):
        problems.append("sync: UpsertBucket carried no config")
    streams = [body for method, path, body in server.requests
               if method == "POST" and path.endswith("/%s/file_stream" % run_id)]
    lines = [json.loads(line) for s in streams
             for line in s.get("files", {}).get("wandb-history.jsonl", {}).get("content", [])]
    if [row.get("_step") for row in lines] != [row.get("_step") for row in history]:
        problems.append("sync: history steps sent %s, log has %s"
                        % ([r.get("_step") for r in lines], [r.get("_step") for r in history]))
    summaries = [json.loads(line) for s in streams
                 for line in s.get("files", {}).get("wandb-summary.json", {}).get("content", [])]
    missing = [k for k in summary if not summaries or k not in summaries[-1]]
    if missing:
        problems.append("sync: summary sent lacks %s" % missing[:10])
    finals = [s for s in streams if s.get("complete")]
    if not finals or finals[-1].get("exitcode") != exit_code:
        problems.append("sync: no final file_stream request with complete and exitcode %d" % exit_code)
    put_paths = {path for method, path, _ in server.requests if method == "PUT"}
    for path in files:
        if "/upload/" + path not in put_paths:
            problems.append("sync: media file %s was not uploaded" % path)
    print("sync: %d GraphQL requests, %d file_stream requests (%d history lines), %d uploads"
          % (len(gql), len(streams), len(lines), len(put_paths)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--config-keys", default="")
    parser.add_argument("--history-keys", default="")
    parser.add_argument("--summary-keys", default="")
    parser.add_argument("--sync", action="store_true", help="also upload a copy with `wandb sync` to a fake server")
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

    if args.sync and not problems:
        check_sync(run_dir, run_id, history, summary, files, exits[0].exit_code, problems)

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
