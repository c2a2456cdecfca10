"""The jobs of the ``morphnet`` command, each a sequence of stages (``stages``) in one session
(``session``), ending in a summary (``summary``): the whole pipeline, learning alone, and a
rebuild from a structure file. Only rank 0 writes or prints."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import morphnet
from morphnet.pipeline import files
from morphnet.pipeline import latency  # measured latency: the run's table and the end-of-run check
from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.finetune import compress_stage, finetuned, learn_result
from morphnet.pipeline.rebuild import check_structure, load_structure
from morphnet.pipeline.session import Session, folder_mode
from morphnet.pipeline.stages import (learn_stage, measure, rebuild_stage, retrain_stage, seed_stage, slim_stage,
                                      uniform_stage, validation_stage)
from morphnet.pipeline.summary import finish, input_summary, learn_summary, slim_summary
from morphnet.pipeline.tables import attention_table, layer_table, learned_model
from morphnet.reporting import format_attention, format_number, format_widths, write_report


def run_pipeline(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Learn the structure, rebuild, retrain slim and seed with the same recipe, evaluate, report.

    ``cfg.out`` must not hold a run unless ``resume`` (continue it from its last checkpoint) or
    ``overwrite`` (replace it). Returns the summary (also written to ``cfg.out/summary.json``).
    """
    session = Session(cfg, folder_mode(resume, overwrite))
    try:
        latency.prepare(session)
        if cfg.finetune:
            return _compress_pipeline(session)
        seed, result = learn_stage(session)
        seed_stats = measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        summary = learn_summary(cfg, session.ctx, result, seed_stats)
        history: dict[str, Any] = {"learn": result.history}
        start = time.perf_counter()
        rebuilt, predicted = rebuild_stage(session, seed, result.chosen.counts, learned_cost=result.chosen.cost,
                                           seed_cost=result.seed_cost, target_cost=result.target_cost)
        slim_stats = measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
        learned_counts = result.chosen.counts
        summary["layers"] = layer_table(seed, copy.deepcopy(rebuilt.model), learned_counts, session.example)
        summary["attention"] = attention_table(
            seed, learned_model(seed, learned_counts, session.example, rebuilt.model, rebuilt.counts), rebuilt.model,
            result.seed_widths, learned_counts, rebuilt.counts)
        summary["seconds"]["rebuild"] = time.perf_counter() - start
        summary["slim"] = slim_summary(cfg, slim_stats, predicted, rebuilt, result.target_cost)
        summary["slim"]["accuracy"], summary["seconds"]["retrain_slim"] = slim_stage(session, rebuilt, history)
        summary["seed"]["accuracy"], seconds, training = seed_stage(session, history)
        if seconds is not None:
            summary["seconds"]["retrain_seed"] = seconds
        if training is not None:
            summary["seed"]["training"] = training
        if cfg.uniform_baseline:
            summary["uniform"], summary["seconds"]["retrain_uniform"] = uniform_stage(
                session, result.seed_widths, slim_stats["cost"], history)
        validation_stage(session, summary)
        summary["latency"] = latency.measure_run(session, summary, result.seed_widths, rebuilt.model)
        return finish(session, summary, history)
    except Exception as error:
        session.note_resume(error, "run")
        raise
    finally:
        session.close()


def _compress_pipeline(session) -> dict[str, Any]:
    """``--seed-weights PATH --finetune``: ``morphnet.compress`` on the trained seed, then the summary
    (seed as given, the compressed network, and with ``--uniform-baseline`` the uniform width
    multiplier of the same cost fine-tuned the same way)."""
    cfg = session.cfg
    slim, report = compress_stage(session)
    result = learn_result(session, report)
    seed = session.start_seed()
    summary = learn_summary(cfg, session.ctx, result, measure(session.new_seed(), session.example, cfg.target,
                                                              cfg.hardware))
    rebuilt, predicted, accuracy = finetuned(session, slim, report)
    slim_stats = measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
    summary["layers"] = layer_table(seed, copy.deepcopy(rebuilt.model), rebuilt.counts, session.example)
    summary["attention"] = attention_table(seed, rebuilt.model, rebuilt.model, result.seed_widths, rebuilt.counts,
                                           rebuilt.counts)
    summary["slim"] = slim_summary(cfg, slim_stats, predicted, rebuilt, result.target_cost)
    summary["slim"].update(accuracy=accuracy, function_check=report["function_check"],
                           training=f"landed on the trained seed's weights ({report['steps']['learn']} learning steps), "
                                    f"BatchNorm statistics re-estimated, fine-tuned {report['steps']['finetune']} steps"
                                    + (" distilling the seed" if report["distill"] else ""))
    summary["seconds"]["compress"] = summary["seconds"].pop("learn")
    summary["seed"]["accuracy"], _, summary["seed"]["training"] = seed_stage(session, {})
    history: dict[str, Any] = {"learn": result.history}
    if cfg.uniform_baseline:
        uniform, uniform_report = compress_stage(session, selection="uniform")
        stats = measure(copy.deepcopy(uniform), session.example, cfg.target, cfg.hardware)
        summary["uniform"] = {**stats, "accuracy": finetuned(session, uniform, uniform_report)[2],
                              "widths": uniform_report["widths"], "training": "the same, one width multiplier",
                              "dir": files.SLIM_UNIFORM}
        summary["seconds"]["compress_uniform"] = uniform_report["seconds"]
    validation_stage(session, summary)
    summary["latency"] = latency.measure_run(session, summary, result.seed_widths, rebuilt.model)
    return finish(session, summary, history)


def learn_only(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Structure learning alone (``morphnet learn``): structures, checkpoint, summary, plots.
    ``resume`` and ``overwrite`` as in :func:`run_pipeline`."""
    session = Session(cfg, folder_mode(resume, overwrite))
    try:
        latency.prepare(session)
        if cfg.finetune:
            return _compress_pipeline(session)
        seed, result = learn_stage(session)
        seed_stats = measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        summary = learn_summary(cfg, session.ctx, result, seed_stats)
        summary["layers"] = layer_table(seed, None, result.chosen.counts, session.example)
        summary["attention"] = attention_table(seed, learned_model(seed, result.chosen.counts, session.example), None,
                                               result.seed_widths, result.chosen.counts, None)
        return finish(session, summary, {"learn": result.history})
    except Exception as error:
        session.note_resume(error, "learn")
        raise
    finally:
        session.close()


def default_structure(out: Path) -> Path:
    """The structure ``morphnet rebuild`` uses without ``--structure``: the one the run in ``out``
    chose (its summary.json names it: in target-cost mode often not the last one written), else,
    for learning that has not finished, the latest ``learned_structure/alive_<step>.json``."""
    chosen = files.chosen_structure(out)
    if chosen is not None:
        if not chosen.is_file():
            raise FileNotFoundError(f"the run in '{out}' chose the structure {chosen}, which no longer exists; "
                                    "pass --structure FILE")
        return chosen
    latest = files.latest_structure(out)
    if latest is None:
        raise FileNotFoundError(f"no learned_structure/alive_*.json in '{out}'; run `morphnet learn --out {out}` "
                                "first or pass --structure FILE")
    return latest


def rebuild_only(cfg: RunConfig, structure: str | Path | None = None, *, retrain: bool = False,
                 slim_dir: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``morphnet rebuild``: build the slim network from a structure file (default: the one the run
    in ``cfg.out`` chose, see :func:`default_structure`), optionally expanded to ``cfg.expand_to``;
    save it, and with ``retrain`` train it from scratch and evaluate it.

    The slim model goes to ``cfg.out/<slim_dir>`` (default: ``slim`` or, when taken, the next free
    ``slim_N``), with ``rebuild.json`` describing it; an existing folder is replaced only with
    ``overwrite``, and the run's summary then records that its slim model was replaced.
    """
    out = Path(cfg.out)
    if structure is None:
        structure = default_structure(out)
    counts = load_structure(structure)
    name = slim_dir or files.new_slim_dir(out)
    if Path(name).name != name or name in files.RUN_FILES and name != files.SLIM:
        raise ValueError(f"--slim-dir must be a plain folder name other than the run's own files, got '{name}'")
    if (out / name).exists() and not overwrite:
        raise files.RunExists(f"'{out / name}' already exists; pass --overwrite to replace it, or another --slim-dir")
    session = Session(cfg, "reuse")
    try:
        latency.prepare(session)
        session.log(f"rebuilding {cfg.model} with the widths of {structure}")
        seed = session.new_seed()
        counts = check_structure(seed, structure, session.example)
        seed_stats = measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        rebuilt, predicted = rebuild_stage(session, seed, counts, learned_cost=None,
                                           seed_cost=seed_stats["cost"], target_cost=None)
        slim_stats = measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
        channels = {row["name"]: row["channels"] for row in morphnet.cost_table(seed, session.example)}
        seed_widths = {n: channels[n] for n in rebuilt.counts}
        attention = attention_table(seed, learned_model(seed, counts, session.example, rebuilt.model, rebuilt.counts),
                                    rebuilt.model, seed_widths, counts, rebuilt.counts)
        summary = {
            "structure_file": str(structure), "seed": seed_stats, "config": cfg.to_dict(),
            "input": input_summary(session),
            "slim": {**slim_stats, "predicted_cost": predicted, "widths": rebuilt.counts,
                     "width_multiplier": rebuilt.width_multiplier, "dir": name},
            "attention": attention,
        }
        if retrain:
            summary["slim"]["accuracy"], _ = retrain_stage(session, rebuilt.model, "retrain_slim", {})
        if session.ctx.is_main:
            morphnet.save_slim(out / name, rebuilt.model.cpu(), rebuilt.counts)
            files.write_json(out / name / files.REBUILD_SUMMARY, summary)
            _note_replaced_slim(out, name)
            expanded = rebuilt.counts if rebuilt.counts != counts else None
            print(format_widths(seed_widths, counts, expanded), flush=True)
            if attention:  # the table `morphnet run` prints (seed -> slim heads per block)
                print(format_attention({"attention": attention}), flush=True)
            print(f"seed {format_number(seed_stats['flops'])} FLOPs, {format_number(seed_stats['params'])} params -> "
                  f"slim {format_number(slim_stats['flops'])} FLOPs (counted "
                  f"{format_number(slim_stats['flops_counted'])}), {format_number(slim_stats['params'])} params; "
                  f"saved to {out / name}", flush=True)
            if "accuracy" in summary["slim"]:
                print(f"slim test accuracy after retraining: {summary['slim']['accuracy']:.2%}", flush=True)
        return summary
    finally:
        session.close()


def _note_replaced_slim(out: Path, name: str) -> None:
    """When ``rebuild --overwrite`` replaced the slim folder a run's summary describes, say so in
    the summary and the report instead of leaving figures that no longer match the files."""
    summary_file = out / files.SUMMARY
    if not summary_file.is_file():
        return
    summary = files.read_json(summary_file)
    if summary.get("slim", {}).get("dir") == name:
        summary["slim"]["replaced_by"] = f"{name}/{files.REBUILD_SUMMARY}"
        files.write_json(summary_file, summary)
        write_report(out)
