#!/usr/bin/env python3
"""CPU per transaction of each PostgreSQL path, for work on the gateway's own cost: where bench_postgres.py
publishes TPS ratios, this keeps one stack up while builds are compared, and reports what each transaction
costs in CPU time (relay process, its shipper, the rest of the machine) in interleaved rounds.

    .venv/bin/python scripts/bench_cpu.py up                    # stack, pgbouncers, gateways; until SIGTERM
    .venv/bin/python scripts/bench_cpu.py regrant               # new grants (they last an hour)
    .venv/bin/python scripts/bench_cpu.py gateway NAME --code DIR [--plaintext] [--set KEY=VALUE ...]
    .venv/bin/python scripts/bench_cpu.py measure --paths gateway,pgbouncer+tls [--protocol prepared]
                                                  [--clients 8] [--rate 12000] [--duration 8] [--rounds 4]

`up` writes the endpoints (environment for libpq, secrets included) to .proctor/bench-cpu/endpoints.json,
mode 0600. `gateway` starts one more gateway process from the code in DIR (a worktree with its extensions
built in place: `pip install -e` there or `python setup.py build_ext --inplace`), with the stack gateway's
settings, its own ports and spool, and the given PROCTOR_* overrides; it registers as path NAME and reuses
the plaintext (--plaintext) or TLS grant. `--rate 0` runs saturated; a fixed rate (pgbench -R) is far
steadier on a shared machine, and then the CPU per transaction is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_postgres as bp  # noqa: E402

DIRECTORY = REPO / ".proctor" / "bench-cpu"
ENDPOINTS = DIRECTORY / "endpoints.json"
TICK = os.sysconf("SC_CLK_TCK")
# path → the (repository, run id) of its grant's pipeline, as bench_postgres.py requests them
GRANTS = {name: list(grant[:2]) for name, grant in bp.GATEWAY_GRANTS.items()} | {
    bp.GATEWAY_PLAINTEXT: list(bp.PLAINTEXT_GRANT)}


def save_endpoints(endpoints: dict[str, dict[str, Any]]) -> None:
    ENDPOINTS.write_text(json.dumps(endpoints, indent=1))
    ENDPOINTS.chmod(0o600)


def load_endpoints() -> dict[str, dict[str, Any]]:
    return json.loads(ENDPOINTS.read_text())


def entry(ep: bp.Endpoint) -> dict[str, Any]:
    return {"env": {k: v for k, v in ep.env().items() if k.startswith("PG")}, "pid": ep.pid}


def up(args: argparse.Namespace) -> int:
    bp.raise_open_files_limit(4096)
    DIRECTORY.mkdir(parents=True, exist_ok=True)
    state = bp.start_stack(DIRECTORY, with_gateway=True)
    bench = bp.Bench(bp.parse_args(["--suites", "pgbench"]), state)
    bouncers: list[bp.PgBouncer] = []
    gateways: list[bp.PlaintextGateway] = []
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        bp.prepare(bench, DIRECTORY)
        bp.prepare_pgbouncer(bench, "pgbouncer", DIRECTORY, bouncers)
        bp.prepare_pgbouncer(bench, "pgbouncer+tls", DIRECTORY, bouncers)
        bp.prepare_gateway(bench)
        bp.prepare_plaintext_gateway(bench, DIRECTORY, gateways)
        endpoints = {name: entry(ep) for name, ep in bench.endpoints.items()}
        for name, grant in GRANTS.items():
            if name in endpoints:
                endpoints[name]["grant"] = grant
        save_endpoints(endpoints)
        bp.log(f"ready: {', '.join(bench.endpoints)} in {ENDPOINTS}")
        while not stop:
            time.sleep(0.5)
    finally:
        for info in load_endpoints().values() if ENDPOINTS.exists() else ():
            if "stop_pgid" in info:
                stop_group(info["stop_pgid"])
        for gateway in gateways:
            gateway.stop()
        for bouncer in bouncers:
            bouncer.stop()
        bp.down(DIRECTORY)
    return 0


def stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
        for _ in range(100):
            os.killpg(pgid, 0)
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_gateway(args: argparse.Namespace) -> int:
    from proctor.dev.gateway import gateway_env, wait_ready

    state = bp.read_state(DIRECTORY)
    endpoints = load_endpoints()
    template = endpoints[bp.GATEWAY_PLAINTEXT if args.plaintext else "gateway"]
    code = Path(args.code).resolve()
    port, admin_port = bp.free_port(), bp.free_port()
    spool = DIRECTORY / f"spool-{args.name}"
    subprocess.run(["rm", "-rf", str(spool)], check=True)
    env = gateway_env(DIRECTORY, state, pg_port=port, admin_port=admin_port) | {
        "PROCTOR_SPOOL_DIR": str(spool), "PYTHONPATH": str(code)}
    env.pop("_CA_FILE")
    if args.plaintext:
        env["PROCTOR_PG_REQUIRE_TLS"] = "false"
    for pair in args.env:
        key, _, value = pair.partition("=")
        env[key] = value
    log_path = DIRECTORY / f"gateway-{args.name}.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, cwd=code, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(admin_port, proc, timeout=60)
    pg_env = dict(template["env"], PGHOST="127.0.0.1", PGPORT=str(port))
    endpoints[args.name] = {"env": pg_env, "pid": proc.pid, "stop_pgid": proc.pid, "grant": template["grant"]}
    save_endpoints(endpoints)
    bp.log(f"{args.name}: pid {proc.pid}, port {port}, code {code}, log {log_path}")
    return 0


def regrant(args: argparse.Namespace) -> int:
    """New grants for every gateway path (they last an hour), one per (repository, run id)."""
    state = bp.read_state(DIRECTORY)
    endpoints = load_endpoints()
    tokens: dict[tuple[str, str], str] = {}
    for name, info in endpoints.items():
        if "grant" in info:
            key = tuple(info["grant"])
            if key not in tokens:
                tokens[key] = bp.request_grant(state, *key)["token"]
            info["env"]["PGPASSWORD"] = tokens[key]
            bp.log(f"{name}: a new grant for {key[0]} run {key[1]}")
    save_endpoints(endpoints)
    return 0


def busy_ticks() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


def tree_ticks(pid: int) -> tuple[int, int]:
    """CPU ticks of the process and of its descendants (the shipper)."""
    def ticks(each: int) -> int:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])

    return ticks(pid), sum(ticks(child) for child in bp.descendants(pid))


def process_ticks() -> dict[int, tuple[str, int, int]]:
    """pid → (command, parent pid, CPU ticks of the process and of the children it reaped)."""
    table = {}
    for entry_ in os.scandir("/proc"):
        if not entry_.name.isdigit():
            continue
        try:
            text = Path(entry_.path, "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        table[int(entry_.name)] = (comm, int(fields[1]), sum(int(f) for f in fields[11:15]))
    return table


def group_of(pid: int, comm: str, parent: int, relay: int | None, relay_tree: set[int]) -> str:
    if pid == relay:
        return "relay"
    if pid in relay_tree:
        return "shipper"
    if comm in ("postgres", "pgbench"):
        return comm
    if pid == 2 or parent == 2:
        return "kernel"
    return "others"


def run_once(name: str, info: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    argv = [bp.tool("pgbench"), "-n", "-S", f"--protocol={args.protocol}", "-c", str(args.clients), "-j",
            str(min(args.clients, 2)), "-T", str(args.duration)]
    if args.rate:
        argv += ["-R", str(args.rate)]
    relay = info.get("pid") if name != "direct" else None
    relay_tree = set(bp.descendants(relay)) if relay else set()
    before, busy0 = process_ticks(), busy_ticks()
    out = subprocess.run(argv, env=os.environ | info["env"], capture_output=True, text=True, check=False)
    after, busy1 = process_ticks(), busy_ticks()
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    tps = re.search(r"^tps = ([\d.]+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not processed or not tps:
        raise RuntimeError(f"{name}: pgbench exit {out.returncode}: {(out.stderr or out.stdout)[-400:]}")
    per = 1e6 / TICK / int(processed.group(1))
    figures = dict.fromkeys(GROUPS, 0.0)
    figures["tps"] = float(tps.group(1))
    latency = re.search(r"^latency average = ([\d.]+) ms", out.stdout, re.MULTILINE)
    figures["latency_us"] = float(latency.group(1)) * 1000 if latency else math.nan
    for pid in before.keys() | after.keys():
        comm, parent, _ = after.get(pid) or before[pid]
        if pid == os.getpid():
            comm = "pgbench"  # what this process reaped: pgbench
        delta = (after[pid][2] if pid in after else 0) - (before[pid][2] if pid in before else 0)
        figures[group_of(pid, comm, parent, relay, relay_tree)] += delta * per
    figures["machine"] = (busy1 - busy0) * per
    return figures


GROUPS = ("relay", "shipper", "postgres", "pgbench", "kernel", "others")


def measure(args: argparse.Namespace) -> int:
    endpoints = load_endpoints()
    paths = args.paths.split(",")
    figures: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for round_no in range(args.rounds):
        order = paths if round_no % 2 == 0 else paths[::-1]
        for path in order:
            for pid in {endpoints[p].get("pid") for p in paths if endpoints[p].get("pid")}:
                bp.wait_until_quiet(pid, limit=20)
            figures[path].append(run_once(path, endpoints[path], args))
            f = figures[path][-1]
            print(f"  round {round_no + 1} {path:24} " + "  ".join(f"{k} {v:8.1f}" for k, v in f.items()),
                  flush=True)
    print(f"\nmedians ({args.protocol}, c{args.clients}, rate {args.rate or 'saturated'}, "
          f"{args.rounds}x{args.duration}s); CPU in µs per transaction")
    keys = ("tps", "latency_us", *GROUPS, "machine")
    print(f"{'path':24} " + " ".join(f"{k:>10}" for k in keys))
    for path in paths:
        print(f"{path:24} " + " ".join(f"{statistics.median(f[k] for f in figures[path]):10.1f}" for k in keys))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("regrant")
    gw = sub.add_parser("gateway")
    gw.add_argument("name")
    gw.add_argument("--code", default=str(REPO))
    gw.add_argument("--plaintext", action="store_true")
    gw.add_argument("--set", dest="env", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of the gateway's environment (repeatable)")
    m = sub.add_parser("measure")
    m.add_argument("--paths", required=True)
    m.add_argument("--protocol", default="prepared", choices=("simple", "extended", "prepared"))
    m.add_argument("--clients", type=int, default=8)
    m.add_argument("--rate", type=int, default=0)
    m.add_argument("--duration", type=int, default=8)
    m.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    return {"up": up, "regrant": regrant, "gateway": start_gateway, "measure": measure}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
