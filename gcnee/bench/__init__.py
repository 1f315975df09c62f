"""Benchmarks (``gcnee bench``): early exit vs its ideal, scoring paths, retrieval, training.

Timings are never asserted in tests; the arithmetic (ideal speedup, achieved fraction, tables)
is. See ``gcnee.bench.early_exit`` for the ideal-speedup formula.
"""

from gcnee.bench.early_exit import (
    achieved_fraction,
    bench_early_exit,
    bench_exit,
    decoder_layer_flops,
    head_cost_layers,
    head_flops,
    ideal_speedup,
)
from gcnee.bench.report import format_report, machine_info, markdown_table
from gcnee.bench.run import BENCHES, bench_all
from gcnee.bench.scoring import bench_scoring, bench_scoring_paths
from gcnee.bench.train import bench_train, time_training_steps

__all__ = [
    "BENCHES",
    "achieved_fraction",
    "bench_all",
    "bench_early_exit",
    "bench_exit",
    "bench_scoring",
    "bench_scoring_paths",
    "bench_train",
    "decoder_layer_flops",
    "format_report",
    "head_cost_layers",
    "head_flops",
    "ideal_speedup",
    "machine_info",
    "markdown_table",
    "time_training_steps",
]
