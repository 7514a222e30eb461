"""What a person running `dptrain run` sees: a progress bar (or plain lines) and a summary table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dptrain.report import format_up

if TYPE_CHECKING:
    from dptrain.events import Progress, TrainingResult
    from dptrain.plan import TrainingPlan

__all__ = ["ConsoleProgress", "print_summary"]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


class ConsoleProgress:
    """A rich progress bar on a TTY; otherwise one plain line per checkpoint."""

    def __init__(self, *, stream: TextIO, rich_bar: bool, quiet: bool) -> None:
        self.stream = stream
        self.rich_bar = rich_bar and not quiet
        self.quiet = quiet
        self.plan: TrainingPlan | None = None
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None:
        self.plan = plan
        if attempt > 1 or resumed_from_step > 0:
            self._line(f"dptrain: resumed from step {resumed_from_step} (attempt {attempt})")
        self._line(
            f"dptrain: plan σ={format_up(plan.noise_multiplier)} q={plan.sample_rate:.4g} steps={plan.steps} "
            f"δ={plan.delta:g} planned ε={format_up(plan.planned_epsilon, 5)} "
            f"(target {plan.target_epsilon:g}, {plan.accountant})"
        )
        if self.rich_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("holdout loss {task.fields[loss]}"),
                TextColumn("ε {task.fields[eps]}/{task.fields[target]}"),
                TextColumn("{task.fields[metric]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "training",
                total=plan.steps,
                completed=resumed_from_step,
                loss="—",
                eps="—",
                target=f"{plan.target_epsilon:g}",
                metric="",
            )

    def on_step(self, progress: Progress) -> None:
        metric = f"{progress.eval_metric} {_fmt(progress.eval_value)}" if progress.eval_value is not None else ""
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=progress.step,
                loss=_fmt(progress.loss),
                eps=format_up(progress.epsilon_spent),
                metric=metric,
            )
            return
        if progress.checkpointed:
            self._line(
                f"step {progress.step}/{progress.total_steps} epoch {progress.epoch:.2f} "
                f"holdout loss {_fmt(progress.loss)} "
                f"ε {format_up(progress.epsilon_spent, 5)}/{self.plan.target_epsilon if self.plan else '?'} {metric}"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def on_finish(self, result: TrainingResult) -> None:
        self.close()

    def on_failure(self, error: BaseException, *, epsilon_spent: float, charged_steps: int, step: int) -> None:
        self.close()


def print_summary(result: TrainingResult, *, output_dir: Path, files: Sequence[Path], console_file: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    plan = result.plan
    table = Table(title=f"dptrain: {result.dataset}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    if result.resumed_from_step or result.attempts > 1:
        table.add_row("resumed", f"from step {result.resumed_from_step} (attempts: {result.attempts})")
    table.add_row(
        "ε spent",
        f"{format_up(result.epsilon, 5)} (target {plan.target_epsilon:g}, "
        f"planned {format_up(plan.planned_epsilon, 5)})",
    )
    table.add_row("δ", f"{plan.delta:g}")
    table.add_row("σ (noise multiplier)", format_up(plan.noise_multiplier, 5))
    counted = f"{plan.unit_column} units" if plan.unit_records else "records"
    table.add_row(
        "q (sample rate)", f"{plan.sample_rate:.5g} (batch {plan.batch_size} / {plan.train_size} declared {counted})"
    )
    table.add_row("steps", f"{result.steps_run} run, {result.charged_steps} charged, {plan.steps} planned")
    if plan.releases:
        table.add_row(
            "held-out releases",
            f"{result.charged_releases} charged of {plan.releases}, "
            f"σ={format_up(plan.holdout_noise_multiplier or 0, 5)}",
        )
    table.add_row("accountant", plan.accountant)
    for name, value in sorted(result.eval_metrics.items()):
        marker = " (headline)" if name == result.eval_metric else ""
        table.add_row(f"held-out {name}{marker}", f"{value:.4f} (released with DP)")
    table.add_row("clipping", f"{result.clipping_mode}, C={plan.max_grad_norm:g}")
    processes = f"{result.world_size} processes × " if result.world_size > 1 else ""
    table.add_row("device", f"{result.device}, {processes}{result.threads} thread(s)")
    table.add_row("time", f"{result.elapsed_seconds:.1f} s")
    table.add_row("output", "\n".join(str(path) for path in files if path.exists()))
    Console(file=console_file).print(table)
