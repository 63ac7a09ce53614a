"""Ledger benchmark: ``Ledger.record_instance`` latency and multi-thread throughput.

Run: ``.venv/bin/python bench/ledger.py [--n 2000] [--threads 8]``. Measures SQLite
(synchronous=FULL, WAL) in a temporary directory and PostgreSQL on 127.0.0.1:5432
(database ``test``, a throw-away schema). Prints median / p95 / p99 per call in ms
and the aggregate rate with several threads recording at once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

from node.ledger import InstanceRecord, Ledger

PG_CONNINFO = "host=127.0.0.1 port=5432 dbname=test user=postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def record(i: int, series: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=series, study_instance_uid="1.2.3", modality="CT",
        series_description="bench", transfer_syntax_uid="1.2.840.10008.1.2.1",
        relpath=f"{series}/{i}.dcm", size=526_000, sha256="0" * 64, calling_ae="BENCH",
        assoc_id=f"assoc-{series}",
    )


def latency(ledger: Ledger, n: int) -> list[float]:
    samples = []
    for i in range(n):
        start = time.perf_counter()
        ledger.record_instance(record(i, "1.2.100"))
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def throughput(ledger: Ledger, n: int, threads: int) -> float:
    def work(t: int) -> None:
        for i in range(n // threads):
            ledger.record_instance(record(i, f"1.2.{200 + t}"))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return (n // threads * threads) / (time.perf_counter() - start)


def run(name: str, url: str, n: int, threads: int) -> None:
    with Ledger.open(url) as ledger:
        latency(ledger, 50)  # warm up: prepared statements, caches
        ms = sorted(latency(ledger, n))
        rate = throughput(ledger, n, threads)
    q = statistics.quantiles(ms, n=100)
    print(f"{name:<10} record_instance median {statistics.median(ms):.3f} ms  "
          f"p95 {q[94]:.3f} ms  p99 {q[98]:.3f} ms  |  {threads} threads: {rate:,.0f}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("sqlite", f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}", args.n, args.threads)
    schema = f"qcnode_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        run("postgresql", f"{PG_URL}?options=-csearch_path%3D{schema}", args.n, args.threads)
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
