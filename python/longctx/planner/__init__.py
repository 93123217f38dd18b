"""The capacity planner behind `longctx plan`: model shapes (models.py: presets and HuggingFace
config.json parsing) and the memory, FLOP and ring-traffic arithmetic (plan.py).

Pure Python, no GPU needed; `longctx.rope_frequencies` checks the models' RoPE settings.
"""
from .models import PRESETS, ModelConfig, ModelConfigError, load_config, resolve_model
from .plan import Plan, PlanDoesNotFit, PlanError, make_plan

__all__ = ["PRESETS", "ModelConfig", "ModelConfigError", "load_config", "resolve_model", "Plan",
           "PlanDoesNotFit", "PlanError", "make_plan"]
