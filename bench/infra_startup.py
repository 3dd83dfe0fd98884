"""Benchmark: how long `python -m pipeline infra up` takes, cold and warm.

Measures, each time end to end (the CLI process from start to exit, which includes Python's
start and the wait until the broker answers a metadata request):

* Kafka cold start: an empty jar cache (a fresh PIPELINE_CACHE_DIR) and an empty Maven local
  repository (a wrapper named ``mvn``, first on PATH, adds ``-Dmaven.repo.local=<empty dir>``
  to the real mvn and logs each call with its duration), so everything is downloaded:
  jars + format + start; the mvn call's own time is reported too.
* Kafka warm start: ``down`` then ``up`` with the cache filled (the data directory is kept,
  so no format); repeated, median reported. Verified: the output says 'jars cached', the
  cache's listing (paths, sizes, mtimes) is unchanged and mvn was not run again.
* Kafka with the cache filled but a fresh state directory (format + start, no download), to
  separate the download from the rest of the cold start.
* The size of the jar cache (and of the Maven repository the cold start filled).
* PostgreSQL: ``up --postgres`` for the first start (initdb + start + CREATE DATABASE) and
  restarts (PostgreSQL stopped alone, the broker left running).

Everything runs under a temporary directory with its own PIPELINE_STATE_DIR, PIPELINE_PG_DIR
and non-default ports, and is stopped and removed at the end (``--keep`` keeps the files).

    ./dev python bench/infra_startup.py [--kafka-port 29092] [--postgres-port 25433]
                                        [--repeat 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, du_bytes, loadavg, machine, markdown_table, median, mib, write_json  # noqa: E402

from ops.infra.kafka_broker import KAFKA_VERSION  # noqa: E402
from ops.infra.state import port_open  # noqa: E402

_KAFKA_LINE = re.compile(r"kafka: started on \S+ in ([\d.]+)s \((jars \w+)\)")
_PG_LINE = re.compile(r"postgres: started on \S+ in ([\d.]+)s")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="bench-infra-"))
        # The postgres user must be able to reach PIPELINE_PG_DIR below this folder.
        os.chmod(self.root, 0o711)
        self.cache = self.root / "cache"
        self.m2 = self.root / "m2"
        self.bin = self.root / "bin"
        self.mvn_log = self.root / "mvn-calls.log"
        self.state_dirs: list[tuple[Path, Path]] = []  # (state dir, pg dir) to bring down
        self._write_mvn_wrapper()

    def _write_mvn_wrapper(self) -> None:
        real = shutil.which("mvn")
        if real is None:
            sys.exit("mvn not found on PATH")
        self.bin.mkdir()
        self.m2.mkdir()
        wrapper = self.bin / "mvn"
        # Not exec: the wrapper also logs each call with its start and end time, so the cold
        # start can be split into Maven's download and the rest.
        wrapper.write_text(
            "#!/bin/sh\n"
            "start=$(date +%s.%N)\n"
            f"'{real}' '-Dmaven.repo.local={self.m2}' \"$@\"\n"
            "rc=$?\n"
            f"echo \"$start $(date +%s.%N) $*\" >> '{self.mvn_log}'\n"
            "exit $rc\n"
        )
        wrapper.chmod(0o755)

    def env(self, state: Path, pg: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "PIPELINE_PG_DIR")}
        env.update(
            PIPELINE_STATE_DIR=str(state), PIPELINE_CACHE_DIR=str(self.cache),
            PIPELINE_PG_DIR=str(pg), PATH=f"{self.bin}:{os.environ.get('PATH', '')}",
            PYTHONPATH=str(REPO_ROOT) + (f":{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else ""),
        )
        return env

    def cli(self, state: Path, pg: Path, *argv: str) -> tuple[float, str]:
        """Run ``python -m pipeline infra ARGV``; returns (seconds, output)."""
        if (state, pg) not in self.state_dirs:
            self.state_dirs.append((state, pg))
        command = [sys.executable, "-m", "pipeline", "infra", *argv]
        if argv[0] == "up":
            command += ["--kafka-port", str(self.args.kafka_port),
                        "--postgres-port", str(self.args.postgres_port)]
        began = time.perf_counter()
        result = subprocess.run(command, env=self.env(state, pg), cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=900, check=False)
        took = time.perf_counter() - began
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{output}")
        return took, output

    def cache_listing(self) -> list[tuple[str, int, int]]:
        return sorted((str(p.relative_to(self.cache)), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in self.cache.rglob("*"))

    def mvn_seconds(self) -> float:
        """How long the (first) mvn call took, from the wrapper's log."""
        start, end = self.mvn_log.read_text().split()[:2]
        return float(end) - float(start)

    def mvn_calls(self) -> int:
        try:
            return len(self.mvn_log.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def cleanup(self) -> None:
        for state, pg in self.state_dirs:
            try:
                self.cli(state, pg, "down")
            except Exception as exc:  # noqa: BLE001 - report and keep cleaning up
                print(f"warning: down for {state} failed: {exc}", file=sys.stderr)
        for port in (self.args.kafka_port, self.args.kafka_port + 1, self.args.postgres_port):
            if port_open("127.0.0.1", port):
                print(f"warning: port {port} still open after down", file=sys.stderr)
        if self.args.keep:
            print(f"files kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def kafka_seconds(output: str) -> tuple[float, str]:
    match = _KAFKA_LINE.search(output)
    if not match:
        raise RuntimeError(f"no 'kafka: started' line in:\n{output}")
    return float(match.group(1)), match.group(2)


def pg_seconds(output: str) -> float:
    match = _PG_LINE.search(output)
    if not match:
        raise RuntimeError(f"no 'postgres: started' line in:\n{output}")
    return float(match.group(1))


def check_accepts_clients(port: int) -> int:
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
    return len(metadata.brokers)


def run(args: argparse.Namespace) -> dict:
    for port in (args.kafka_port, args.kafka_port + 1, args.postgres_port):
        if port_open("127.0.0.1", port):
            sys.exit(f"port {port} is in use: choose other ports")
    bench = Bench(args)
    results: dict = {"machine": machine(), "kafka_version": KAFKA_VERSION, "repeat": args.repeat}
    state, pg = bench.root / "state", bench.root / "pg"
    try:
        # CLI overhead: `infra status` starts Python, imports the package and checks pid files.
        status_times = [bench.cli(state, pg, "status")[0] for _ in range(args.repeat)]
        results["cli_status_s"] = status_times

        # (a) cold start
        print("kafka cold start (empty jar cache, empty Maven repository) ...", flush=True)
        took, output = bench.cli(state, pg, "up")
        inner, how = kafka_seconds(output)
        if how != "jars downloaded" or bench.mvn_calls() != 1:
            raise RuntimeError(f"cold start did not download ({how}, mvn calls {bench.mvn_calls()})")
        brokers = check_accepts_clients(args.kafka_port)
        results["kafka_cold"] = {"wall_s": took, "reported_s": inner, "how": how, "brokers_seen": brokers,
                                 "mvn_s": bench.mvn_seconds()}
        print(f"  {took:.1f}s ({output.strip().splitlines()[0]})", flush=True)

        # (c) sizes
        jars = list((bench.cache / "kafka" / KAFKA_VERSION / "libs").glob("*.jar"))
        results["jar_cache_bytes"] = du_bytes(bench.cache)
        results["jar_count"] = len(jars)
        results["maven_repo_bytes"] = du_bytes(bench.m2)
        listing = bench.cache_listing()

        # (b) warm starts: down, up
        warm = []
        for i in range(args.repeat):
            bench.cli(state, pg, "down")
            took, output = bench.cli(state, pg, "up")
            inner, how = kafka_seconds(output)
            unchanged = bench.cache_listing() == listing
            if how != "jars cached" or not unchanged or bench.mvn_calls() != 1:
                raise RuntimeError(f"warm start {i} downloaded something: {how}, listing unchanged "
                                   f"{unchanged}, mvn calls {bench.mvn_calls()}")
            warm.append({"wall_s": took, "reported_s": inner, "how": how, "cache_unchanged": unchanged})
            print(f"  warm {i + 1}: {took:.1f}s", flush=True)
        results["kafka_warm"] = warm

        # PostgreSQL first start (initdb) with the broker already running, then restarts
        print("postgres first start (initdb) ...", flush=True)
        took, output = bench.cli(state, pg, "up", "--postgres")
        results["pg_first"] = {"wall_s": took, "reported_s": pg_seconds(output)}
        print(f"  {took:.1f}s", flush=True)
        os.environ["PIPELINE_PG_DIR"] = str(pg)  # for LocalPostgres below (this process only)
        from ops.infra.postgres import LocalPostgres
        from pipeline.settings import Settings

        local_pg = LocalPostgres(Settings.from_env(bench.env(state, pg)), port=args.postgres_port)
        restarts = []
        for i in range(args.repeat):
            if not local_pg.stop():
                raise RuntimeError("PostgreSQL was not running before a restart")
            took, output = bench.cli(state, pg, "up", "--postgres")
            if "kafka: already running" not in output:
                raise RuntimeError(f"the broker should have stayed up:\n{output}")
            restarts.append({"wall_s": took, "reported_s": pg_seconds(output)})
            print(f"  restart {i + 1}: {took:.1f}s", flush=True)
        results["pg_restart"] = restarts
        results["pg_data_bytes"] = du_bytes(pg)
        bench.cli(state, pg, "down")

        # Cache filled, fresh state directory: format + start, nothing downloaded.
        fresh = []
        for i in range(args.repeat):
            state_i, pg_i = bench.root / f"state-fresh-{i}", bench.root / f"pg-fresh-{i}"
            took, output = bench.cli(state_i, pg_i, "up")
            inner, how = kafka_seconds(output)
            if how != "jars cached" or bench.cache_listing() != listing or bench.mvn_calls() != 1:
                raise RuntimeError(f"fresh-state start {i} downloaded something ({how})")
            bench.cli(state_i, pg_i, "down")
            fresh.append({"wall_s": took, "reported_s": inner})
            print(f"  fresh state {i + 1}: {took:.1f}s", flush=True)
        results["kafka_fresh_state"] = fresh
    finally:
        bench.cleanup()
    return results


def report(results: dict) -> str:
    def med(key: str, field: str = "wall_s") -> float:
        return median([r[field] for r in results[key]])

    n = results["repeat"]
    cold = results["kafka_cold"]
    rows = [
        ["Kafka cold start: download (empty jar cache + empty Maven repo) + format + start",
         f"{cold['wall_s']:.1f}", f"{cold['reported_s']:.1f}", "1"],
        ["... of which `mvn dependency:copy-dependencies` (download into the empty repo)",
         f"{cold['mvn_s']:.1f}", "-", "1"],
        ["Kafka, jars cached, fresh state dir: format + start",
         f"{med('kafka_fresh_state'):.1f}", f"{med('kafka_fresh_state', 'reported_s'):.1f}", f"median of {n}"],
        ["Kafka warm start (`down`, `up`; jars cached, data kept)",
         f"{med('kafka_warm'):.1f}", f"{med('kafka_warm', 'reported_s'):.1f}", f"median of {n}"],
        ["PostgreSQL first start `up --postgres` (initdb + start + CREATE DATABASE; broker already up)",
         f"{results['pg_first']['wall_s']:.1f}", f"{results['pg_first']['reported_s']:.1f}", "1"],
        ["PostgreSQL restart `up --postgres` (broker already up)",
         f"{med('pg_restart'):.1f}", f"{med('pg_restart', 'reported_s'):.1f}", f"median of {n}"],
        ["CLI overhead: `infra status` (Python start + imports)",
         f"{median(results['cli_status_s']):.2f}", "-", f"median of {n}"],
    ]
    table = markdown_table(["step", "wall s (CLI end to end)", "s reported by `up`", "runs"], rows)
    sizes = markdown_table(["what", "size"], [
        [f"jar cache (`$PIPELINE_CACHE_DIR/kafka/{results['kafka_version']}`), "
         f"{results['jar_count']} jars", mib(results["jar_cache_bytes"])],
        ["Maven local repository after the cold start (plugins + jars)", mib(results["maven_repo_bytes"])],
        ["PostgreSQL cluster after initdb + restarts", mib(results["pg_data_bytes"])],
    ])
    checks = ("Checks: the cold start printed 'jars downloaded' and ran mvn once; every later "
              "`up` printed 'jars cached', left the cache's listing (paths, sizes, mtimes) "
              "unchanged and did not run mvn.")
    return f"{table}\n\n{sizes}\n\n{checks}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kafka-port", type=int, default=29092,
                        help="broker port (the controller uses the next one)")
    parser.add_argument("--postgres-port", type=int, default=25433)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each warm measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = parser.parse_args()
    results = run(args)
    results["loadavg_end"] = loadavg()
    m = results["machine"]
    print(f"\nKafka {results['kafka_version']}; {m.get('nproc')} CPUs, "
          f"{m.get('mem_total_gib')} GiB memory, {m.get('cpu', '?')}; load average (1 min) "
          f"{m.get('loadavg_1_5_15', ['?'])[0]} at start, {results['loadavg_end']} at end\n")
    print(report(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
