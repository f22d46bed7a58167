"""`lorakit` command line: train, sweep, eval, generate, chat, merge, export, info (every method: LoRA, IA3, the prompt
methods, LST)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .core.errors import LoraConfigError
from .methods.lorahub.settings import DEFAULTS, STARTS
from .training.settings import DataSection, ModelSection, TrainingConfig

__all__ = ["main"]


def _train(args: argparse.Namespace) -> None:
    from .training.recipe import load_run_config, run

    config = load_run_config(args.config, args.overrides)
    if args.resume:
        config.training.resume = True
    run(config)


def _sweep(args: argparse.Namespace) -> None:
    from .training import sweep_report

    if args.report:
        path = sweep_report.write_report(sweep_report.load_study(args.report, args.study, args.storage), args.report)
        print(f"report written to {path}")
        return
    if args.sweep_file is None:
        raise LoraConfigError("lorakit sweep needs a sweep file (or --report DIR to rebuild a sweep's report).")
    from .training.sweep import load_sweep, run_sweep

    if args.trials is not None:
        _positive(args.trials, "--trials")
    config, space = load_sweep(args.sweep_file, args.trials)  # the whole space checked before anything trains
    study = run_sweep(config, space, args.study, args.storage)
    print(f"{len(study.trials)} trials in study {study.study_name!r}; report in {Path(config.output_dir) / 'results.md'}")


def _eval(args: argparse.Namespace) -> None:
    from .methods.lst.files import is_lst_folder, read_lst
    from .methods.peft_methods import load_peft_model, read_any_adapter
    from .training import base_models, data
    from .training.settings import size_of
    from .training.tasks import task_for

    section = DataSection(args.data, args.seed, args.test_size, args.validation_size)  # checks the sizes
    _positive(args.batch_size, "--batch-size")
    examples = data.load_examples(args.data)
    task = task_for(args.task, examples)
    splits = data.split_examples(examples, args.seed, size_of(section.test_size), size_of(section.validation_size))
    if args.adapter:
        (read_lst if is_lst_folder(args.adapter) else read_any_adapter)(args.adapter)  # a broken adapter fails before the model loads
    model, tokenizer = base_models.load(args.model, task.model_task, task.num_labels, quantization=args.quantization)
    if args.adapter and is_lst_folder(args.adapter):
        from .methods.lst.model import LSTModel

        model = LSTModel.from_pretrained(model, args.adapter)
    elif args.adapter:
        model = load_peft_model(model, args.adapter)
    print(json.dumps(task.evaluate(model, tokenizer, splits.test, args.batch_size), indent=2))


def _speakers(args: argparse.Namespace):
    from .training import base_models
    from .training.generation import Sampling, Speakers, parse_adapter_flags

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # checked before the model loads
    adapters = parse_adapter_flags(args.adapter)
    model, tokenizer = base_models.load(args.model, quantization=args.quantization)
    return Speakers(model, tokenizer, adapters), sampling


def _generate(args: argparse.Namespace) -> None:
    from .training.generation import say

    speakers, sampling = _speakers(args)
    turns = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
    say(speakers, {name: turns for name in speakers.names}, sampling, _write)


def _chat(args: argparse.Namespace) -> None:
    from .training.generation import chat

    speakers, sampling = _speakers(args)
    show_prompt = lambda: None  # noqa: E731  (input piped in: no prompt to show)
    if sys.stdin.isatty():
        print(f"chatting with {', '.join(speakers.names)}: /reset clears the conversation, /exit leaves.", file=sys.stderr)
        show_prompt = lambda: print("> ", end="", file=sys.stderr, flush=True)  # noqa: E731
    chat(speakers, sys.stdin, sampling, _write, args.system, prompt=show_prompt)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise LoraConfigError(f"{flag} {value}: use an integer >= 1.")


def _merge(args: argparse.Namespace) -> None:
    from .core.errors import LoraError
    from .methods.lst.files import is_lst_folder
    from .methods.peft_methods import load_peft_model, model_class_for, read_any_adapter
    from .training import base_models

    if is_lst_folder(args.adapter):
        raise LoraError("an LST side network runs beside the backbone, it is not an update of its weights: there is nothing to "
                        "merge. Load it with lorakit.methods.lst.model.LSTModel.from_pretrained(model, directory).")
    adapter = read_any_adapter(args.adapter)  # a broken or unmergeable adapter fails before the model loads
    refusal = model_class_for(adapter.config).merge_refusal
    if refusal:
        raise LoraError(refusal)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise LoraConfigError(f"--out {args.out} exists and is not empty: name a new folder for the merged model.")
    model, tokenizer = base_models.load(args.model)
    merged = load_peft_model(model, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out}")


def _info(args: argparse.Namespace) -> None:
    from .core.run_layout import RunLayout

    if RunLayout(args.adapter).is_run():  # a training run directory
        _run_info(Path(args.adapter), [Path(other) for other in args.compare])
        return
    _adapter_info(args.adapter)


def _adapter_info(directory: str | Path) -> None:
    from .core.peft_format import is_a_key
    from .methods.lst.files import is_lst_folder, read_lst
    from .methods.peft_methods import read_any_adapter

    if is_lst_folder(directory):
        lst_config, lst_tensors = read_lst(directory)
        print(f"LST side network: {directory}")
        print(json.dumps({k: v for k, v in dataclasses.asdict(lst_config).items() if v is not None}, indent=2))
        print(f"side blocks: {sum(1 for key in lst_tensors if key.startswith('side.ladders.') and key.endswith('.weight'))}  "
              f"parameters: {sum(t.numel() for t in lst_tensors.values()):,d} in {len(lst_tensors)} tensors")
        return
    adapter = read_any_adapter(directory)
    config, tensors = adapter.config, adapter.tensors
    print(f"adapter: {directory}")
    print(json.dumps({k: v for k, v in config.to_peft_dict().items() if v not in (None, False, {}, [])}, indent=2))
    if "prompt_embeddings" in tensors:
        print(f"virtual tokens: {config.num_virtual_tokens}  saved table: {tuple(tensors['prompt_embeddings'].shape)}")
    elif any(key.endswith(".ia3_l") for key in tensors):
        scaled = [tensor.shape for key, tensor in tensors.items() if key.endswith(".ia3_l")]
        inputs = sum(shape[0] == 1 for shape in scaled)
        print(f"modules rescaled: {len(scaled)} ({len(scaled) - inputs} outputs, {inputs} inputs)")
    else:
        ranks: dict[int, int] = {}
        for key, tensor in tensors.items():
            if is_a_key(key):
                ranks[tensor.shape[0]] = ranks.get(tensor.shape[0], 0) + 1
        print(f"modules adapted: {sum(ranks.values())}  ranks: {dict(sorted(ranks.items()))}")
    print(f"parameters: {sum(t.numel() for t in tensors.values()):,d} in {len(tensors)} tensors")


def _run_info(run_dir: Path, others: list[Path]) -> None:
    """The rank structure of a run's total update, and a diagnostics plot (with `others` beside it)."""
    from .core.run_layout import RunLayout
    from .methods.lst.files import is_lst_folder
    from .methods.peft_methods import read_peft_type
    from .methods.plora.diagnostics import plot_diagnostics

    layout = RunLayout(run_dir)
    if layout.adapter.is_dir() and (is_lst_folder(layout.adapter) or read_peft_type(layout.adapter) != "LORA"):  # rank diagnostics: LoRA only
        print(layout.summary.read_text() if layout.summary.is_file() else f"run: {run_dir} (no summary yet)")
        _adapter_info(layout.adapter)
        return
    runs = {run_dir.name: run_dir}
    for other in others:  # labelled by folder name, by full path where two names are equal
        runs[str(other) if other.name in runs else other.name] = other
    plot = RunLayout(run_dir).diagnostics_plot
    summary = plot_diagnostics(runs, plot)[run_dir.name]
    ranks, stored = sorted(summary["effective_ranks"]), sorted(summary["stored_ranks"])
    print(f"run: {run_dir}  PLoRA stages: {summary['stages']}  layers: {len(ranks)}")
    print(f"total update rank (stored factors): {stored[0]}..{stored[-1]}")
    print(f"effective rank per layer: min {ranks[0]:.1f}  median {ranks[len(ranks) // 2]:.1f}  max {ranks[-1]:.1f}")
    print(f"plot: {plot}")


def _export_plora(args: argparse.Namespace) -> None:
    from .methods.plora.export import export_plora

    report = export_plora(args.run_dir, args.out, args.rank)
    kind = "exact" if args.rank is None else f"compressed to rank {args.rank}"
    print(f"PLoRA total update ({report['stages']} stages + live adapter, {kind}, r={report['rank']}) written to {args.out}")
    if args.rank is not None:
        print(f"relative error ||ΔW - ΔW_K||/||ΔW||: max {report['max_relative_error']:.2e}, mean {report['mean_relative_error']:.2e}")


def _hub_learn(args: argparse.Namespace) -> None:
    import io
    import random

    from .methods.lorahub import compose, search, settings
    from .methods.lorahub.library import expand_libraries
    from .training import base_models, data

    args.modules = [str(module) for module in expand_libraries(args.modules)]
    _positive(args.n_examples, "--n-examples")
    search.check_search_settings(args.budget, args.lam, settings.DEFAULTS["bounds"], args.population, start=args.start)
    search.nevergrad_name(args.optimizer)
    compose.load_modules(args.modules)  # every module read and checked before the model loads
    examples = data.load_examples(args.examples)
    if len(examples) > args.n_examples:
        examples = random.Random(args.seed).sample(examples, args.n_examples)
    model, tokenizer = base_models.load(args.model)
    result = search.learn(model, args.modules, examples, tokenizer, budget=args.budget, lam=args.lam,
                       optimizer=args.optimizer, seed=args.seed, population=args.population, start=args.start)
    out = Path(args.out)
    record = {"modules": args.modules, "weights": result.weights, "losses": result.losses, "optimizer": args.optimizer,
              "budget": args.budget, "start": args.start, "seed": args.seed, "examples": [ex.prompt for ex in examples], "seconds": result.seconds}
    plot = io.BytesIO()
    search.plot_result(result, args.modules, plot)
    result.module.save(out, extra_files={"lorahub.json": json.dumps(record, indent=1) + "\n", "lorahub.png": plot.getvalue()})
    print(f"best objective {min(result.losses):.4f} after {len(result.losses)} evaluations ({result.seconds:.1f} s)")
    print("weights: " + ", ".join(f"{Path(m).name}={w:+.3f}" for m, w in zip(args.modules, result.weights)))
    print(f"composed adapter, lorahub.json and lorahub.png written to {out}")


def _hub_build(args: argparse.Namespace) -> None:
    from .training.hub_build import build_library

    records = build_library(args.tasks, args.out, args.config, args.overrides, args.keep_checkpoints, args.workers)
    for record in records:
        before = "n/a" if record["accuracy_before"] is None else f"{record['accuracy_before']:.3f}"
        print(f"{record['folder']}: {before} -> {record['accuracy_after']:.3f} own-task accuracy, best step {record['best_step']} "
              f"of {record['steps']}")
    print(f"{len(records)} modules; library.json and library.png written to {args.out}")


def _export(args: argparse.Namespace) -> None:
    from .methods.residual import export_plain_lora_files, save_residual_model_files
    from .training import base_models

    if not (args.out or args.residual_model):
        raise LoraConfigError("lorakit export needs --out (plain LoRA) and/or --residual-model (residual base).")
    if args.out:
        export_plain_lora_files(args.adapter, args.out)
        print(f"plain LoRA for the original base written to {args.out}")
    if args.residual_model:
        model, tokenizer = base_models.load(args.model)
        save_residual_model_files(args.adapter, model, args.residual_model)
        tokenizer.save_pretrained(args.residual_model)
        print(f"residual base model (for the adapter as saved) written to {args.residual_model}")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    model, data, training = ModelSection(), DataSection(), TrainingConfig()
    parser.add_argument("--model", default=model.name)
    parser.add_argument("--task", default=model.task, choices=["causal-lm", "classification"],
                        help="classification: the model gets a sequence-classification head over the data's options")
    parser.add_argument("--quantization", default=model.quantization, choices=["none", "nf4", "fp4", "int8"],
                        help="load the base's linear layers quantised, as a QLoRA adapter was trained")
    parser.add_argument("--adapter")
    parser.add_argument("--data", default=data.source)
    parser.add_argument("--seed", type=int, default=data.seed)
    parser.add_argument("--test-size", type=float, default=data.test_size)
    parser.add_argument("--validation-size", type=float, default=data.validation_size)
    parser.add_argument("--batch-size", type=int, default=training.eval_batch_size)


def _add_talk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=ModelSection().name, help="an embedded model or a local HF model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="a saved adapter of any kind; repeat for several side by side (each answers every prompt)")
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"])
    parser.add_argument("--system", help="a system prompt opening the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning in HF PEFT's format.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter from a YAML config (default: the embedded defaults)")
    train.add_argument("config", nargs="?", help="YAML file with model/data/lora/training sections")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.steps=100")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in training.output_dir")
    train.set_defaults(func=_train)

    sweep = commands.add_parser("sweep", help="hyper-parameter search (Optuna): each trial a training run, the study in a database")
    sweep.add_argument("sweep_file", nargs="?", help="YAML: base recipe, space, objective, sampler, pruner, trials")
    sweep.add_argument("--trials", type=int, help="finished trials the study should hold (overrides the file)")
    sweep.add_argument("--study", help="study name (default: the output folder's name)")
    sweep.add_argument("--storage", help="Optuna RDB URL shared by several processes (default: SQLite in the output folder)")
    sweep.add_argument("--report", metavar="DIR", help="rebuild the results table, best/ and plots of the sweep in DIR")
    sweep.set_defaults(func=_sweep)

    evaluation = commands.add_parser("eval", help="test accuracy of a model (and adapter) on a task")
    _add_eval_arguments(evaluation)
    evaluation.set_defaults(func=_eval)

    generate = commands.add_parser("generate", help="answer one prompt (streamed), once per adapter with several")
    generate.add_argument("prompt")
    _add_talk_arguments(generate)
    generate.set_defaults(func=_generate)

    chat = commands.add_parser("chat", help="a multi-turn conversation on the terminal (/reset, /exit)")
    _add_talk_arguments(chat)
    chat.set_defaults(func=_chat)

    merge = commands.add_parser("merge", help="write the base model with an adapter folded in")
    merge.add_argument("adapter")
    merge.add_argument("--model", default=ModelSection().name)
    merge.add_argument("--out", required=True)
    merge.set_defaults(func=_merge)

    export = commands.add_parser("export", help="PiSSA/MiLoRA adapter -> plain rank-2r LoRA for the original base model")
    export.add_argument("adapter", help="adapter directory saved by lorakit (with initial_factors.safetensors)")
    export.add_argument("--out", help="write the plain rank-2r LoRA for the original base here")
    export.add_argument("--residual-model", help="write the residual base model (W - s·B0@A0) here")
    export.add_argument("--model", default=ModelSection().name, help="the original base, for --residual-model")
    export.set_defaults(func=_export)

    export_plora = commands.add_parser("export-plora", help="a (PLoRA) run's whole update as one adapter for the original base")
    export_plora.add_argument("run_dir", help="training run directory (with adapter/ and plora/)")
    export_plora.add_argument("--out", help="output adapter directory (default: RUN_DIR/adapter_total[_rK])")
    export_plora.add_argument("--rank", type=int, help="compress to this rank by truncated SVD (default: exact)")
    export_plora.set_defaults(func=_export_plora)

    hub_parser = commands.add_parser("lorahub", aliases=["hub"], help="LoraHub: compose trained LoRA modules for a new task from a few examples")
    hub_commands = hub_parser.add_subparsers(dest="hub_command", required=True)
    hub_build = hub_commands.add_parser("build", help="train one LoRA module per task into a library folder (early stopping, resumable)")
    hub_build.add_argument("--tasks", required=True, help="comma-separated BIG-bench tasks or data files, or a file with one per line")
    hub_build.add_argument("--out", required=True, help="the library folder")
    hub_build.add_argument("--config", help="a `lorakit train` YAML file for every module (default: the paper's r=16 q/v modules)")
    hub_build.add_argument("--workers", type=int, default=1, help="modules trained at once, each in its own process on its share "
                           "of the cores (2 on a 2-core CPU: 1.1x the throughput)")
    hub_build.add_argument("--keep-checkpoints", action="store_true", help="keep finished modules' checkpoints (default: only their adapters)")
    hub_build.add_argument("overrides", nargs="*", help="section.key=value settings for every module, e.g. training.lr=1e-3")
    hub_build.set_defaults(func=_hub_build)
    hub_learn = hub_commands.add_parser("learn", help="find module weights on a few examples (gradient-free)")
    hub_learn.add_argument("--modules", nargs="+", required=True, help="adapter directories and/or library folders from `hub build` (same targets and rank)")
    hub_learn.add_argument("--examples", required=True, help="a .jsonl/.csv/.parquet file or bigbench:TASK")
    hub_learn.add_argument("--out", required=True, help="where the composed adapter goes")
    hub_learn.add_argument("--model", default=ModelSection().name)
    hub_learn.add_argument("--n-examples", type=int, default=DEFAULTS["n_examples"], help="examples drawn (seeded) when the source has more")
    hub_learn.add_argument("--budget", type=int, default=DEFAULTS["budget"])
    hub_learn.add_argument("--lam", type=float, default=DEFAULTS["lam"], help="weight of the L1 term mean|w|")
    hub_learn.add_argument("--optimizer", default=DEFAULTS["optimizer"], help="a nevergrad optimiser name, e.g. NGOpt, CMA")
    hub_learn.add_argument("--population", type=int, help="candidates per batched evaluation (default: CMA's size, else 1)")
    hub_learn.add_argument("--start", choices=STARTS, default=DEFAULTS["start"], help="where the search starts: all weights 0 "
                           "(the paper) or the module that scores best alone (N more evaluations, one batched forward)")
    hub_learn.add_argument("--seed", type=int, default=0)
    hub_learn.set_defaults(func=_hub_learn)

    info = commands.add_parser("info", help="an adapter's config, ranks and size; for a run directory the update's rank structure and a plot")
    info.add_argument("adapter", help="adapter directory or training run directory")
    info.add_argument("--compare", nargs="*", default=[], help="more run directories to plot beside it (e.g. plain LoRA)")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``lorakit`` command line.

    Argument errors and ``--help`` exit through argparse (``SystemExit``); an exception that is neither a
    lorakit error nor an ``OSError`` is a bug and propagates with its traceback.

    Args:
        argv: the arguments after the program name; None means ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, or 2 for a user's mistake (a lorakit error, or an ``OSError`` such as a
        full disk), whose message is printed on one line to stderr.
    """
    args = build_parser().parse_args(argv)
    if args.command == "export-plora" and args.out is None:
        args.out = str(Path(args.run_dir) / ("adapter_total" if args.rank is None else f"adapter_total_r{args.rank}"))
    if args.command == "train" and args.config and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        args.func(args)
    except Exception as err:  # lorakit's own errors carry the fix; show them without a traceback
        from .core.errors import LoraError

        if isinstance(err, (LoraError, OSError)):  # OSError: a full disk, a folder without write permission...
            print(f"lorakit: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
