"""Where and in which order the variants run: in this process, in forked workers one after another,
or in forked workers whose timed steps are interleaved; repeated over rounds.

On a shared CPU the machine's load drifts during a run. ``interleave`` keeps one forked worker per
variant alive and takes the timed steps round-robin, so a drift hits every variant alike; each
worker's peak RSS is its variant's alone. CUDA cannot be used in forked workers, so on CUDA the
variants run in this process (``none``).
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
import traceback
from multiprocessing.connection import Connection
from typing import Callable

from bench.measure import step_stats
from bench.report import log_record
from bench.step import run_variant
from bench.variants import new_record, variant_name

Log = Callable[[str], None]


def _dead_worker_record(process: multiprocessing.Process, stage: str, ckpt: bool) -> dict:
    """The record of a worker that died without sending one (killed by signal 9: out of memory)."""
    process.join()
    code = process.exitcode
    return new_record(stage, ckpt, status="oom" if code == -9 else "error",
                      error=f"worker exited with code {code} (killed: out of memory?)")


def _fork_worker(conn: Connection, args: argparse.Namespace, shape: dict, stage: str, ckpt: bool,
                 device_str: str, interleaved: bool = False) -> None:
    """A forked worker's body: run the variant, send its record.

    Interleaved, it first waits for ``"setup"`` (workers build and warm up one at a time), answers
    ``("ready", None)``, then times one step per ``"step"`` (answering ``("time", seconds)``) until
    another command, and sends ``("record", record)``.
    """
    driver = None
    if interleaved:
        if conn.recv() != "setup":
            conn.close()
            return

        def driver(step, steps):
            conn.send(("ready", None))
            times = []
            while conn.recv() == "step":
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
                conn.send(("time", times[-1]))
            return times
    try:
        result = run_variant(args, shape, stage, ckpt, device_str, driver)
    except BaseException as exc:  # noqa: BLE001 -- the parent must get a record whatever happens
        result = new_record(stage, ckpt, status="error", error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc()[-4000:])
    conn.send(("record", result) if interleaved else result)
    conn.close()


def run_variant_isolated(args: argparse.Namespace, shape: dict, stage: str, ckpt: bool, device_str: str) -> dict:
    """One variant in a forked worker: its peak RSS is its own, and a crash cannot end the run."""
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_fork_worker, args=(child_conn, args, shape, stage, ckpt, device_str))
    process.start()
    child_conn.close()
    try:
        result = parent_conn.recv()
    except EOFError:
        return _dead_worker_record(process, stage, ckpt)
    process.join()
    return result


def run_variants_interleaved(args: argparse.Namespace, shape: dict, variants: list[tuple[str, bool]],
                             device_str: str, log: Log) -> list[dict]:
    """CPU: one forked worker per variant, all alive at once; the timed steps go round-robin (one step
    of each variant in turn, the order rotated every cycle), so a change in the machine's load hits
    every variant alike. Setup and warm-up run one worker at a time. Records in ``variants`` order."""
    ctx = multiprocessing.get_context("fork")
    workers = []
    for stage, ckpt in variants:
        parent_conn, child_conn = ctx.Pipe()
        process = ctx.Process(target=_fork_worker, args=(child_conn, args, shape, stage, ckpt, device_str, True))
        process.start()
        child_conn.close()
        workers.append(dict(name=variant_name(stage, ckpt), stage=stage, ckpt=ckpt, conn=parent_conn,
                            process=process, record=None))

    def receive(worker):
        try:
            return worker["conn"].recv()
        except EOFError:
            return ("record", _dead_worker_record(worker["process"], worker["stage"], worker["ckpt"]))

    active = []
    for worker in workers:
        t0 = time.perf_counter()
        log(f"[bench] {worker['name']}: build + warm-up ...")
        worker["conn"].send("setup")
        kind, payload = receive(worker)
        if kind == "ready":
            active.append(worker)
            log(f"[bench]   ready ({time.perf_counter() - t0:.1f} s)")
        else:
            worker["record"] = payload
            log(f"[bench]   {payload['status']}: {payload.get('error')}")
    for cycle in range(args.steps):
        order = active[cycle % len(active):] + active[:cycle % len(active)] if active else []
        times = []
        for worker in order:
            worker["conn"].send("step")
            kind, payload = receive(worker)
            if kind == "time":
                times.append(f"{worker['name']} {payload:.3f}s")
            else:
                worker["record"] = payload
                active.remove(worker)
                times.append(f"{worker['name']} {payload['status']}")
        log(f"[bench] cycle {cycle + 1}/{args.steps}: " + ", ".join(times))
    for worker in active:
        worker["conn"].send("done")
        kind, payload = receive(worker)
        worker["record"] = payload
    for worker in workers:
        worker["process"].join()
        worker["conn"].close()
    return [w["record"] for w in workers]


def _pool(records: dict[str, dict], record: dict, round_index: int) -> None:
    """Fold a round's record into the variant's first: pooled step times, the larger peak memory."""
    first = records.get(record["name"])
    if first is None:
        record["rounds"] = 1
        records[record["name"]] = record
    elif record["status"] == "ok":
        first["step_s"] = step_stats(first["step_s"]["all"] + record["step_s"]["all"])
        first["rounds"] += 1
        if record["peak_memory"]["bytes"] > first["peak_memory"]["bytes"]:
            first["peak_memory"] = record["peak_memory"]
    else:
        first.setdefault("round_errors", []).append(f"round {round_index + 1}: {record.get('error')}")


def run_rounds(args: argparse.Namespace, shape: dict, variants: list[tuple[str, bool]], device_str: str,
               isolate: str, log: Log, save_partial: Callable[[list[dict]], None]) -> dict[str, dict]:
    """Run the variants ``--rounds`` times (a fresh model each time) and pool their timed steps.

    ``isolate`` is ``interleave``, ``fork`` or ``none``. A variant that failed is not run again;
    ``--profile`` and ``--check_flops`` apply to the first round only. ``save_partial(records)`` is
    called after every variant (not interleaved) and every round. Returns the records by name.
    """
    records: dict[str, dict] = {}
    rounds = max(1, args.rounds)
    for round_index in range(rounds):
        round_args = args if round_index == 0 else argparse.Namespace(**dict(vars(args), profile=None, check_flops=False))
        todo = [v for v in variants if records.get(variant_name(*v), {}).get("status", "ok") == "ok"]
        if isolate == "interleave":  # all variants of the round together, steps round-robin
            log(f"[bench] round {round_index + 1}/{rounds}: interleaved workers" if rounds > 1 else
                "[bench] interleaved workers (one per variant)")
            round_records = run_variants_interleaved(round_args, shape, todo, device_str, log)
            for record in round_records:
                log_record(record, log, args.quiet)
        else:
            round_records = []
            for stage, ckpt in todo:
                t0 = time.perf_counter()
                log(f"[bench] {variant_name(stage, ckpt)}" + (f" (round {round_index + 1}/{rounds})" if rounds > 1 else "") + " ...")
                if isolate == "fork":
                    record = run_variant_isolated(round_args, shape, stage, ckpt, device_str)
                else:
                    record = run_variant(round_args, shape, stage, ckpt, device_str)
                record["wall_s"] = time.perf_counter() - t0
                round_records.append(record)
                log_record(record, log, args.quiet)
                save_partial(list(records.values()) + round_records)
        for record in round_records:
            _pool(records, record, round_index)
        save_partial(list(records.values()))
    return records
