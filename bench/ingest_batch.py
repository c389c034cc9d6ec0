"""One micro-batch, measured: N synthetic events already in Kafka -> raw/, billing_events/
and quarantine/.

Starts its own Apache Kafka (KRaft) unless --bootstrap is given, and prints:
  - decode only (Polars, in memory)
  - Kafka range read (assign + consume, into a frame)
  - the whole ingest_offsets call (read + decode + dedupe + validate + enrich + three Delta
    appends + offset commit)

    .venv/bin/python bench/ingest_batch.py --events 1000000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime

from machine_info import machine  # bench/ is the script folder, so on sys.path

from billing_dagster.decoding import decode_json_records
from billing_dagster.delta_lake import LakeLocation
from billing_dagster.enrichment import write_reference_data
from billing_dagster.ingest import CleaningContext, ingest_offsets
from billing_dagster.kafka_io import KafkaClient, KafkaSettings, ensure_topic
from billing_dagster.local_infra.kafka import ApacheKafka
from billing_dagster.offsets import OffsetRange
from billing_dagster.producer import make_producer, produce_records
from billing_dagster.synthetic import SyntheticBillingStream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--invalid-rate", type=float, default=0.005)
    parser.add_argument("--bootstrap", help="use this broker instead of starting Kafka")
    parser.add_argument("--reads", type=int, default=1, help="repeat the range read, median")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"events: {args.events:,}, invalid rate {args.invalid_rate:.2%}, 24 partitions")
    broker = nullcontext() if args.bootstrap else ApacheKafka(heap="2g")
    with broker as kafka:
        bootstrap = args.bootstrap or kafka.bootstrap_servers
        topic = f"bench-{int(time.time())}"
        ensure_topic(bootstrap, topic, partitions=24)
        stream = SyntheticBillingStream(seed=1, invalid_rate=args.invalid_rate)
        records = list(stream.records(args.events))
        started = time.perf_counter()
        produce_records(make_producer(bootstrap), topic, records)
        print(f"produce: {args.events / (time.perf_counter() - started):,.0f} events/s (setup)")

        with KafkaClient(KafkaSettings(bootstrap, consumer_group=f"{topic}-read")) as client:
            ranges = [OffsetRange(p, 0, end) for p, end in client.end_offsets(topic).items()]
            reads = []
            for _ in range(args.reads):
                # CPU beside wall time: this process, librdkafka's threads included.
                started, cpu = time.perf_counter(), time.process_time()
                frame, _ = client.read(topic, ranges)
                reads.append((time.perf_counter() - started, time.process_time() - cpu))
        read_s, read_cpu = (statistics.median(times) for times in zip(*reads, strict=True))
        print(
            f"kafka range read: {frame.height / read_s:,.0f} events/s ({read_s:.2f} s, "
            f"CPU {read_cpu:.2f} s; median of {len(reads)})"
        )

        started = time.perf_counter()
        decoded = decode_json_records(frame, run_id="bench", now=datetime.now(UTC))
        decode_s = time.perf_counter() - started
        print(
            f"decode+contract rules: {frame.height / decode_s:,.0f} events/s ({decode_s:.2f} s; "
            f"{decoded.quarantine.height} quarantined)"
        )

        with (
            tempfile.TemporaryDirectory() as lake_dir,
            KafkaClient(KafkaSettings(bootstrap, consumer_group=f"{topic}-ingest")) as client,
        ):
            lake = LakeLocation(lake_dir)
            reference = stream.reference_data()
            write_reference_data(lake, reference)
            started = time.perf_counter()
            report = ingest_offsets(
                client,
                lake,
                topic,
                ranges,
                cleaning=CleaningContext(reference=reference),
                run_id="b",
            )
            total_s = time.perf_counter() - started
        print(
            f"ingest_offsets (read+decode+clean+Delta+commit): "
            f"{report.records_read / total_s:,.0f} events/s ({total_s:.2f} s; "
            f"{report.accepted} accepted, {report.duplicates} duplicates, "
            f"{report.quarantined} quarantined; balanced: {report.balanced})"
        )


if __name__ == "__main__":
    main()
