"""``morphnet run | learn | rebuild | cost | report``: a thin argparse layer over ``morphnet.pipeline``.

Every subcommand runs on the embedded default (digits CNN on scikit-learn's digits) when given no
model or data. Bad arguments end with ``morphnet: error: ...`` on stderr and exit code 2; Python
warnings are shown as ``morphnet: warning: ...`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import traceback
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from morphnet import __version__
from morphnet.data import DATA_HELP, DataError
from morphnet.pipeline import files
from morphnet.pipeline.config import DEFAULT_TARGET_COST, RunConfig
from morphnet.pipeline.regularizers import UNITS, regularizer_names
from morphnet.pipeline.resume import Interrupted
from morphnet.seeds import SeedError, list_seeds

DOCS = "Docs and examples: README.md."
EPILOG = DOCS + " Under torchrun, `learn` and `run` use DistributedDataParallel."


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming the option and pointing at ``--help``, not the usage
    block (17 lines for ``morphnet run``) with the error at its end."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=None, help=(
        f"seed network: a built-in ({', '.join(list_seeds())}; default digits_cnn), torchvision:NAME, "
        "timm:NAME, package.module:factory or path/to/file.py:factory"))
    group.add_argument("--data", default=None, help=DATA_HELP)
    group.add_argument("--image-size", type=_positive_int, default=None,
                       help="resize every image to this size, for every --data (default: the data's own size, 32 for "
                            "folders, or the fixed size of a model that has one, e.g. 224 for timm ViTs)")
    group.add_argument("--seed", type=int, default=None, help="random seed of initialization, data order and splits (default 0)")
    group.add_argument("--hardware", default=None,
                       help="hardware of the latency model: a roofline entry (e.g. V100, T4, H100), 'measured' "
                            "(time the model's ops on --device and fit a latency model, cached) or a saved table "
                            "(.json)")
    group.add_argument("--latency-batch-size", type=_positive_int, default=None,
                       help="batch size of measured latency and of the end-of-run latency check (default 1)")


def _run_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", default=None, help=out_help)
    group.add_argument("--device", default=None, help="auto (a GPU when available), cpu, cuda or cuda:N")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads per process (default: PyTorch's choice, lowered to the cores that other "
                            "work leaves idle, since busy threads slow PyTorch down a lot)")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines; results only")


def _folder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("an --out folder that already holds a run")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (finished stages are skipped; "
                             "options left out come from its config.json)")
    choice.add_argument("--overwrite", action="store_true",
                        help="delete the run in --out (every file it wrote) and start a new one")


def _debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, print the full Python traceback")


def _learn_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structure learning")
    group.add_argument("--target", choices=sorted(UNITS), default=None, help="resource to reduce (default flops)")
    group.add_argument("--regularizer", choices=regularizer_names(), default=None,
                       help="penalty source: gamma (BatchNorm scales) or group-lasso (weights); default gamma")
    group.add_argument("--strength", type=float, default=None,
                       help="fixed regularization strength (the original behaviour); with --target-cost, "
                            "the starting strength (default 1 / seed cost)")
    group.add_argument("--target-cost", type=float, default=None,
                       help=f"steer the strength to land on this cost: <= 1 a fraction of the seed's, > 1 "
                            f"absolute (default {DEFAULT_TARGET_COST} unless --strength is given)")
    group.add_argument("--tolerance", type=float, default=None, help="accepted relative distance to --target-cost (default 0.05)")
    group.add_argument("--threshold", type=float, default=None,
                       help="alive threshold of the regularizer's source: gamma, BatchNorm scale (default 0.01); "
                            "group-lasso, fraction of each layer's initial channel-norm scale (default 0.1)")
    group.add_argument("--min-layer-fraction", type=float, default=None,
                       help="keep at least this fraction of every layer's channels alive and unpenalized "
                            "(default 0.25; 0 turns the floor off)")
    group.add_argument("--proximal", action="store_true", default=None,
                       help="apply the penalty as a soft-threshold step after each optimizer step (exact zeros, "
                            "no oscillation under momentum) instead of adding it to the loss")
    group.add_argument("--steps", type=_positive_int, default=None, help="structure learning steps (default 1500)")
    group.add_argument("--batch-size", type=_positive_int, default=None, help="batch size per process (default 64)")
    group.add_argument("--lr", type=float, default=None, help="fixed learning rate of structure learning (default 0.05)")
    group.add_argument("--export-every", type=_positive_int, default=None,
                       help="write learned_structure/alive_<step>.json every N steps (default steps/10; always the last)")
    group.add_argument("--log-every", type=_positive_int, default=None, help="record metrics every N steps (default 10)")


def _rebuild_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rebuild")
    group.add_argument("--expand-to", type=float, default=None,
                       help="scale all widths of the structure by one factor to spend this budget (<= 1: fraction of the "
                            "seed's cost, > 1: absolute)")
    group.add_argument("--round-to", type=_positive_int, default=None,
                       help="round every width to a multiple of N (default 8 on a CUDA target: a GPU --hardware, "
                            "or 'measured' on a CUDA device; 1 keeps any width)")


def _retrain_options(parser: argparse.ArgumentParser, steps_default: str, *, seed_weights: bool) -> None:
    group = parser.add_argument_group("retraining")
    group.add_argument("--retrain-steps", type=_positive_int, default=None,
                       help=f"steps of retraining from scratch (default: {steps_default})")
    group.add_argument("--retrain-lr", type=float, default=None, help="peak learning rate of retraining, cosine decay (default 0.05)")
    if not seed_weights:
        return
    group.add_argument("--seed-weights", default=None, metavar="PATH",
                       help="trained weights of the seed (a state_dict file): learning starts from them and the "
                            "seed's accuracy is measured as given instead of retraining it")
    group.add_argument("--finetune", action="store_true", default=None,
                       help="compress the trained seed (--seed-weights) with morphnet.compress: land on "
                            "--target-cost at once on its weights, re-estimate BatchNorm statistics and fine-tune "
                            "--retrain-steps steps distilling the seed")
    group.add_argument("--finetune-lr", type=float, default=None,
                       help="peak learning rate of fine-tuning (default: --retrain-lr / 5)")
    group.add_argument("--learn-fraction", type=float, default=None,
                       help="with --finetune: the share of --retrain-steps spent learning with MorphNet's penalty "
                            "before landing (default 0: it lost 5-10 points on our development task)")


def build_parser() -> argparse.ArgumentParser:
    """The ``morphnet`` argument parser."""
    parser = _Parser(
        prog="morphnet", epilog=EPILOG,
        description="MorphNet for PyTorch: learn layer widths under a FLOP, size or latency budget.",
    )
    parser.add_argument("--version", action="version", version=f"morphnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the whole pipeline: learn, rebuild, retrain, evaluate, report",
                              description="Learn the structure, rebuild, retrain slim and seed with the same "
                                          "recipe, evaluate both and write a report.", epilog=EPILOG)
    _model_options(run)
    _learn_options(run)
    _rebuild_options(run)
    _retrain_options(run, "--steps", seed_weights=True)
    run.add_argument("--no-baseline", action="store_true", help="do not train the seed for comparison")
    uniform = run.add_mutually_exclusive_group()
    uniform.add_argument("--uniform-baseline", action="store_true", default=None,
                         help="also train the seed with all widths scaled by one factor to the slim network's cost "
                              "(with --finetune: compress the trained seed that way, the default there)")
    uniform.add_argument("--no-uniform-baseline", dest="uniform_baseline", action="store_false", default=None,
                         help="with --finetune: skip the uniform network (halves the fine-tuning time)")
    run.add_argument("--val-fraction", type=float, default=None,
                     help="hold out this share of the training data (e.g. 0.1; no step trains on it) and compare "
                          "the slim and uniform networks on it, so that choosing between them never reads the "
                          "test data (needs the uniform baseline)")
    run.add_argument("--no-latency-check", action="store_true",
                     help="do not time the seed, slim and uniform networks at the end of the run")
    _run_options(run, "run folder (default morphnet_run)")
    _folder_options(run)
    _debug_option(run)

    learn = commands.add_parser("learn", help="structure learning only: write learned_structure/alive_<step>.json",
                                description="Learn the structure of the seed network: train it with the "
                                            "cost-weighted penalty and write the alive channels of every layer "
                                            "to learned_structure/alive_<step>.json, with a summary and a report. "
                                            "`morphnet rebuild` builds the slim network from them.", epilog=EPILOG)
    _model_options(learn)
    _learn_options(learn)
    _run_options(learn, "run folder (default morphnet_run)")
    _folder_options(learn)
    _debug_option(learn)

    rebuild = commands.add_parser("rebuild", help="build the slim network from a learned structure",
                                  description="Build the slim network: the seed with the widths of a structure "
                                              "file (by default the one the run in --out chose, named in its "
                                              "summary.json), freshly initialized, optionally expanded or "
                                              "rounded, saved into --out. Model and data default to those of "
                                              "the run in --out.", epilog=DOCS)
    _model_options(rebuild)
    rebuild.add_argument("--structure", default=None,
                         help="alive-count JSON file (default: the structure the run in --out chose; the latest "
                              "learned_structure/alive_<step>.json when it has no summary)")
    rebuild.add_argument("--target", choices=sorted(UNITS), default=None, help="resource of --expand-to (default flops)")
    _rebuild_options(rebuild)
    rebuild.add_argument("--retrain", action="store_true", help="also retrain the slim network and evaluate it")
    _retrain_options(rebuild, "the run's --retrain-steps, else 1500", seed_weights=False)
    rebuild.add_argument("--slim-dir", default=None,
                         help="folder name inside --out for the slim model (default: slim, or the next free slim_N "
                              "when taken, so the run's own slim/ is never replaced)")
    rebuild.add_argument("--overwrite", action="store_true", help="replace --slim-dir when it exists")
    _run_options(rebuild, "run folder to read the structure from and write the slim model into (default morphnet_run)")
    _debug_option(rebuild)

    cost = commands.add_parser("cost", help="per-layer FLOPs, size, latency and channels of a model",
                               description="Print the per-layer cost table of the seed network (or of the slim "
                                           "network a --structure file gives) on one input of --data: FLOPs, "
                                           "weights, roofline latency, channels and which regularizer source "
                                           "covers each layer.", epilog=DOCS)
    _model_options(cost)
    cost.add_argument("--structure", default=None, help="show the slim network built with this alive-count JSON")
    cost.add_argument("--device", default=None, help="where --hardware measured times the model (default auto)")
    cost.add_argument("--json", action="store_true", help="print the rows as JSON")
    _debug_option(cost)

    report = commands.add_parser("report", help="render a run folder's plots and summary into report.html",
                                 description="Render the plots and the summary of a run folder (written by "
                                             "`morphnet run` or `morphnet learn`) into its report.html again.",
                                 epilog=DOCS)
    report.add_argument("run_dir", help="the --out folder of `morphnet run` or `morphnet learn`")
    _debug_option(report)
    return parser


def _config(args: argparse.Namespace, saved: dict | None = None) -> RunConfig:
    """A RunConfig from the options given; options left out come from ``saved`` (a run's
    config.json), then from RunConfig's defaults."""
    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in (saved or {}).items() if k in names}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    if getattr(args, "no_baseline", False):
        values["baseline"] = False
    if getattr(args, "no_latency_check", False):
        values["latency_check"] = False
    return RunConfig.from_saved(values) if saved else RunConfig.from_dict(values)


def _location(error: BaseException) -> str:
    """Where the innermost cause of ``error`` was raised: the deepest frame outside PyTorch,
    morphnet and the standard library (the user's model code), else the deepest frame."""
    while error.__cause__ is not None:
        error = error.__cause__
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    import torch

    libraries = [os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__),
                 sysconfig.get_paths()["stdlib"]]
    own = [f for f in frames if not any(os.path.abspath(f.filename).startswith(p) for p in libraries)]
    frame = (own or frames)[-1]
    return f"{frame.filename}:{frame.lineno}, in {frame.name}"


EXPECTED = (SeedError, DataError, FileNotFoundError, ValueError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, ``morphnet: warning: ...``, not Python's file, line and source
    (``--debug`` shows those)."""
    print(f"morphnet: warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``morphnet`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not getattr(args, "debug", False):
                warnings.showwarning = _show_warning
            return _dispatch(args)
    except BrokenPipeError:  # `morphnet cost | head`: the reader left, nothing to report
        sys.stderr.close()
        return 141
    except KeyboardInterrupt as error:
        if getattr(args, "debug", False):
            raise
        saved = isinstance(error, Interrupted)
        print(f"morphnet: interrupted{': ' + str(error) if saved else ''}", file=sys.stderr)
        if args.command in ("run", "learn"):
            out = args.out or RunConfig.out
            print(f"morphnet: continue with `morphnet {args.command} --resume --out {out}`"
                  + ("" if saved else " (from the last checkpoint)"), file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        expected = isinstance(error, EXPECTED)
        message = str(error) if expected else f"{type(error).__name__}: {error}"
        if not expected or error.__cause__ is not None:
            where = _location(error)
            message += f" (at {where}; --debug shows the full traceback)" if where else ""
        message = "; ".join([message, *getattr(error, "__notes__", [])])  # how to continue a run it stopped
        print(f"morphnet: error: {message}", file=sys.stderr)
        return 2 if expected else 1


def _dispatch(args: argparse.Namespace) -> int:
    from morphnet import pipeline
    from morphnet.reporting import format_cost_table, write_report

    if args.command == "report":
        print(write_report(Path(args.run_dir)))
        return 0
    if args.command == "cost":
        rows, header = pipeline.cost_report(_config(args), args.structure)
        print(json.dumps(rows, indent=2) if args.json else header + "\n" + format_cost_table(rows))
        return 0
    out = Path(args.out or RunConfig.out)
    saved_file = out / files.CONFIG
    if args.command == "rebuild":
        saved = files.read_json(saved_file) if saved_file.is_file() else None
        cfg = _config(args, saved)
        cfg.out = str(out)
        pipeline.rebuild_only(cfg, args.structure, retrain=args.retrain, slim_dir=args.slim_dir,
                              overwrite=args.overwrite)
        return 0
    if args.resume and not saved_file.is_file():
        raise FileNotFoundError(f"'{out}' holds no run to resume (no {files.CONFIG}); start one without --resume")
    cfg = _config(args, files.read_json(saved_file) if args.resume else None)
    job = pipeline.learn_only if args.command == "learn" else pipeline.run_pipeline
    job(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
