"""The benchmark's outputs: progress lines, the JSON report (also partial) and its Markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

from bench.analysis import GIB

SCHEMA = "fantasy_world.bench.train_step/1"


def log_record(record: dict, log: Callable[[str], None], quiet: bool) -> None:
    """One progress line for a finished variant (and its traceback on stderr unless ``quiet``)."""
    if record["status"] == "ok" and not record.get("step_s"):
        log(f"[bench]   {record['name']}: {record['flops']['model'] / 1e12:.4g} TFLOP model, "
            f"{record['flops']['recompute'] / 1e12:.4g} TFLOP recomputed (FLOP count only)")
    elif record["status"] == "ok":
        log(f"[bench]   {record['name']}: median {record['step_s']['median']:.4f} s (IQR {record['step_s']['iqr']:.4f}), "
            f"{record['flops']['model'] / 1e9:.4g} GFLOP, peak {record['peak_memory']['bytes'] / GIB:.2f} GiB"
            + (f", wall {record['wall_s']:.1f} s" if "wall_s" in record else ""))
    else:
        log(f"[bench]   {record['name']}: {record['status']}: {record.get('error')}")
        if record.get("traceback") and not quiet:
            print(record["traceback"], file=sys.stderr)


def write_partial(path: Path, report: dict, results: list[dict]) -> None:
    """The report with the records so far, in case the run is cut short (e.g. a time limit on a lent GPU)."""
    path.write_text(json.dumps(dict(report, results=results, partial=True), indent=1, default=str))


def write_report(report: dict, prefix: str) -> tuple[Path, Path, str]:
    """Write ``<prefix>.json`` and ``<prefix>.md``, remove ``<prefix>.partial.json``; returns both paths
    and the Markdown."""
    out_json, out_md = Path(prefix + ".json"), Path(prefix + ".md")
    out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(prefix + ".partial.json").unlink(missing_ok=True)
    markdown = render_markdown(report)
    out_md.write_text(markdown)
    return out_json, out_md, markdown


def _fmt_bytes_gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _flop_unit(report: dict) -> tuple[float, str]:
    values = [r["flops"]["model"] for r in report["results"] if r.get("flops")]
    return (1e12, "TFLOP") if values and max(values) >= 1e12 else (1e9, "GFLOP")


def _losses(report: dict) -> dict:
    """The loss of each stage, from its first record that has one."""
    losses: dict[str, str] = {}
    for record in report["results"]:
        if record.get("loss"):
            losses.setdefault(record["stage"], record["loss"])
    return losses


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    parts, values = [], sorted(values)
    start = prev = None
    for v in values + [None]:
        if start is None:
            start = prev = v
        elif v is not None and v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    return ", ".join(parts) if values else "none"


def _memory_note(settings: dict) -> str:
    if settings["device"] == "meta":
        return "not measured (meta device: FLOP count only, no timings)"
    if settings["device"].startswith("cuda"):
        return "torch.cuda.max_memory_allocated (reset per variant, weights + optimizer state + activations)"
    if settings.get("isolate") in ("fork", "interleave"):
        return "peak RSS of the variant's forked worker (in brackets: its growth over the worker's start)"
    return "peak RSS of this process (monotone: later variants include earlier peaks)"


def _header(report: dict, scale: float, unit: str) -> list[str]:
    """Title and the bullet list: date, machine, command, model and shape, compute, FantasyWorld."""
    host, shape, settings = report["machine"], report["shape"], report["settings"]
    cfg = report["config"]
    lines = [
        f"## Training step: plain vs FantasyWorld, `{cfg['name']}` DiT, {shape['tokens']:,} video tokens",
        "",
        f"- date: {report['date']}",
        f"- machine: {host.get('device_name')}; CPU {host.get('cpu_model')} ({host.get('cpu_count')} logical CPUs, "
        f"{host.get('torch_threads')} torch threads); torch {host.get('torch')}"
        + (f", CUDA {host.get('cuda')}" if host.get("cuda") else "")
        + (f"; 1-min load average {host['load_average_start'][0]:.2f} at start, {host['load_average_end'][0]:.2f} at end"
           if host.get("load_average_start") and host.get("load_average_end") else ""),
        f"- command: `{report['command']}`"
        + (f" (commit {report['source'].get('git_commit')}, model code sha256 {report['source'].get('model_code_sha256')})"
           if report.get("source") else ""),
        f"- model: dim {cfg['dim']}, {cfg['num_layers']} blocks, {cfg['num_heads']} heads, ffn {cfg['ffn_dim']}"
        + (" (overrides of the named configuration: " + ", ".join(f"{k}={v}" for k, v in cfg["overrides"].items()) + ")"
           if cfg.get("overrides") else "") + "; "
        f"video {shape['height']}x{shape['width']}x{shape['num_frames']} -> latent {tuple(shape['latent'])} -> "
        f"token grid {tuple(shape['grid'])} = {shape['tokens']:,} tokens/sample, batch {settings['batch']}, "
        f"text {settings['text_len']} tokens",
        "- compute: meta device, FLOP count only (one forward + backward on shapes: no data, no optimizer step, no "
        "timing)" if settings["device"] == "meta" else
        f"- compute: {settings['device']}, {settings['dtype']}"
        + (" autocast, fp32 master weights for trained parameters, frozen parameters in "
           + (settings["dtype"] if settings["frozen_dtype"] == "compute" else "fp32") if settings["dtype"] != "fp32" else "")
        + f"; AdamW lr {settings['lr']}; {settings['warmup']} warm-up + {settings['steps']} timed steps per variant"
        + (f" in each of {settings['rounds']} rounds (steps pooled)" if settings.get("rounds", 1) > 1 else "") + "; "
        f"memory: {_memory_note(settings)}"
        + ("; timed steps interleaved round-robin across the variants' workers" if settings.get("isolate") == "interleave" else ""),
    ]
    fw = next((r.get("fantasy_world") for r in report["results"] if r.get("fantasy_world")), None)
    if fw:
        lines.append(
            f"- FantasyWorld: split {fw['split_layer']}, layout {fw['token_layout']}, {fw['extra_tokens']} extra tokens, "
            f"cross-attention {fw['cross_attn_heads']} heads, camera {fw['camera_condition']}"
            + (f" (adapters on video blocks {_ranges(fw.get('camera_adapter_blocks') or [])})" if fw.get("camera_condition") else "")
            + f"; geometry checkpointing {settings['geometry_checkpointing']} (with ckpt on)"
            + "; losses: " + "; ".join(f"{stage}: {loss}" for stage, loss in _losses(report).items())
        )
    if report.get("matmul_rate"):
        m = report["matmul_rate"]
        lines.append(f"- measured matrix-multiply rate ({m['n']}^3 {m['dtype']}): {m['flops_per_s'] / scale:.3g} {unit}/s")
    return lines


def _results_table(report: dict, scale: float, unit: str) -> list[str]:
    """One row per variant: timings, FLOPs, memory, trainable parameters and ratios against plain."""
    lines = [
        f"| variant | ckpt | status | step median (s) | IQR (s) | min-max (s) | tokens/s | model {unit}/step | "
        f"recompute {unit} | achieved {unit}/s | peak mem (GiB) | trainable (M) | FLOPs vs plain (model / +recompute) "
        f"| time vs plain (same ckpt) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        peak = r.get("peak_memory") or {}
        mem = _fmt_bytes_gib(peak.get("bytes"))
        if peak.get("kind") == "rss":
            mem += f" (+{_fmt_bytes_gib(peak.get('growth_bytes'))})"
        ckpt = "on" if r["checkpointing"] else "off"
        if r["status"] != "ok":
            lines.append(f"| {r['stage']} | {ckpt} | {r['status']}: {r.get('error', '')[:80]} | - | - | - | - | - | - | - | "
                         f"{mem} | - | - | - |")
            continue
        flop_ratio = "-"
        if r.get("model_flop_ratio_vs_plain") is not None:
            flop_ratio = f"{r['model_flop_ratio_vs_plain']:.3f}x / {r['hardware_flop_ratio_vs_plain']:.3f}x"
        s = r.get("step_s")
        timing = "- | - | - | -"
        achieved, ratio = "-", "-"
        if s:
            timing = f"{s['median']:.3f} | {s['iqr']:.3f} | {s['min']:.3f}-{s['max']:.3f} | {r['tokens_per_s']:,.0f}"
            achieved = f"{r['achieved_flops_per_s'] / scale:.4g}"
            ratio = "-" if r.get("ratio_vs_plain") is None else f"{r['ratio_vs_plain']:.3f}x"
        lines.append(
            f"| {r['stage']} | {ckpt} | ok | {timing} | {r['flops']['model'] / scale:.4g} | {r['flops']['recompute'] / scale:.4g} | "
            f"{achieved} | {mem} | {r['params_trainable'] / 1e6:.2f} | {flop_ratio} | {ratio} |"
        )
    return lines


def _rope_lines(report: dict) -> list[str]:
    """The standalone extra-token RoPE timings and each FantasyWorld variant's share of its step."""
    rope = report.get("rope")
    if not rope:
        return []
    lines = ["", f"Extra-token RoPE ({rope['extra_tokens']} extra of {rope['geo_tokens']:,} geometry tokens): geometry "
             f"table build {rope['table_build_s'] * 1e3:.3f} ms, apply_rotary on the extra rows {rope['rope_extra_rows_forward_s'] * 1e3:.3f} ms "
             f"forward / {rope['rope_extra_rows_backward_s'] * 1e3:.3f} ms backward (full geometry sequence "
             f"{rope['rope_full_geo_forward_s'] * 1e3:.3f} ms forward)."]
    for r in report["results"]:
        if r.get("rope_extra"):
            e = r["rope_extra"]
            c = e["calls"]
            lines.append(f"- {r['name']}: {c['forward']} + {c['recompute']} (recomputed) forward and "
                         f"{c['forward_needing_grad']} backward geometry-stream apply_rotary calls per step -> "
                         f"{e['seconds_upper'] * 1e3:.3f} ms = {100 * e['share_upper']:.4f}% of the step (upper bound; "
                         f"proportional estimate {100 * e['share_proportional']:.5f}%)")
    return lines


def _targets_table(report: dict) -> list[str]:
    if not report.get("targets"):
        return []
    lines = ["", "| target (issues 7, 13) | value | status |", "|---|---:|---|"]
    for t in report["targets"]:
        if "value" not in t:
            lines.append(f"| {t['target']} | - | {t['status']} ({t.get('note', '')}) |")
            continue
        if t["kind"] == "share_max":
            value = f"{100 * t['value']:.4f}%"
        elif t["kind"] == "gib_max":
            value = f"{t['value']:.2f} GiB"
        else:
            value = f"{t['value']:.3f}x"
        status = t["status"]
        if status == "missed":
            status += f" by {100 * t['by']:.1f}%"
        if t.get("variant"):
            status += f" ({t['variant']})"
        if t.get("note"):
            status += f" ({t['note']})"
        lines.append(f"| {t['target']} | {value} | {status} |")
    return lines


def render_markdown(report: dict) -> str:
    """The report as Markdown: header bullets, the variants table, RoPE lines, targets, FLOP formula."""
    scale, unit = _flop_unit(report)
    lines = _header(report, scale, unit) + [""] + _results_table(report, scale, unit)
    lines += _rope_lines(report) + _targets_table(report)
    lines += ["", f"FLOPs: {report['flop_formula']}", ""]
    return "\n".join(lines)
