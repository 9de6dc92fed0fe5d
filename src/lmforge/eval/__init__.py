"""Evaluation: metrics, task files, a model seam (`EvalModel`), LLM-as-judge, a code sandbox, `run_eval`."""
from .judge import Judge, parse_rating, parse_verdict
from .metrics import bleu, choice_accuracy, contains, exact_match, normalize_answer, pass_at_k, rouge
from .model import EvalModel, LocalModel, perplexity, sliding_windows
from .runner import EvalConfig, evaluate_task, markdown_table, run_eval, split_eval_args
from .sandbox import SandboxResult, run_program
from .tasks import Task, load_tasks

__all__ = ["Judge", "parse_rating", "parse_verdict", "bleu", "choice_accuracy", "contains", "exact_match",
           "normalize_answer", "pass_at_k", "rouge", "EvalModel", "LocalModel", "perplexity", "sliding_windows",
           "EvalConfig", "evaluate_task", "markdown_table", "run_eval", "split_eval_args", "SandboxResult",
           "run_program", "Task", "load_tasks"]
