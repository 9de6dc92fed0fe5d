"""The resource planner: what a training run or a deployment needs in GPU memory, before it runs."""
from .memory import (Estimate, Overheads, TrainSetup, inference_memory, kv_cache_bytes_per_token, max_context,
                     max_concurrent_sequences, max_micro_batch, param_bytes, param_counts, train_memory, weight_bytes,
                     zero_model_state_bytes)
from .planner import (GPUS, OutOfMemoryPrediction, PlanConfig, check_fits, check_training_fits, format_estimate, load_model_config,
                      parse_bytes, recommend, run_plan, setup_from_train, split_plan_args, train_tokens_per_s)

__all__ = ["Estimate", "Overheads", "TrainSetup", "inference_memory", "kv_cache_bytes_per_token", "max_context",
           "max_concurrent_sequences", "max_micro_batch", "param_bytes", "param_counts", "train_memory",
           "weight_bytes", "zero_model_state_bytes", "GPUS", "OutOfMemoryPrediction", "PlanConfig", "check_fits", "check_training_fits",
           "format_estimate", "load_model_config", "parse_bytes", "recommend", "run_plan", "setup_from_train", "split_plan_args",
           "train_tokens_per_s"]
