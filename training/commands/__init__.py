"""The subcommands that `training` adds to `asr` (entry point ``training.cli:register``), one module per group."""

from __future__ import annotations

from .adapt import add_adapt_parser, add_bench_adapt_parser
from .bench import add_bench_accuracy_parser, add_bench_long_parser, add_bench_train_parser
from .lm import add_lm_parser, add_tune_parser
from .punctuator import add_bench_punctuate_parser, add_train_punctuator_parser
from .train import add_average_parser, add_data_parser, add_eval_parser, add_manifest_parser, add_train_parser


def register(subparsers, bench_commands) -> None:
    add_train_parser(subparsers)
    add_average_parser(subparsers)
    add_data_parser(subparsers)
    add_lm_parser(subparsers)
    add_train_punctuator_parser(subparsers)
    add_adapt_parser(subparsers)
    add_tune_parser(subparsers)
    add_eval_parser(subparsers)
    add_manifest_parser(subparsers)
    add_bench_train_parser(bench_commands)
    add_bench_accuracy_parser(bench_commands)
    add_bench_long_parser(bench_commands)
    add_bench_punctuate_parser(bench_commands)
    add_bench_adapt_parser(bench_commands)
