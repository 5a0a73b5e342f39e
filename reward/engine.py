"""What an `accelerate launch` configuration must agree on with a trainer's own options.

accelerate lets its launch configuration override a trainer silently: `ACCELERATE_GRADIENT_ACCUMULATION_STEPS`
(`--gradient_accumulation_steps`, or a DeepSpeed config's `gradient_accumulation_steps`) replaces the accumulation
the trainer asked for, and DeepSpeed keeps its own clipping. The reference LRM code lost its effective batch this
way (design/method.md section 2.4). Here a disagreement is an input error, and what DeepSpeed leaves at "auto" is
filled from the trainer's options, so one set of flags describes the run under DDP, FSDP and ZeRO-2 alike.
"""

from __future__ import annotations

from typing import Any

from lpo.core.errors import InputError


def agree(accelerator: Any, micro_batch: int, grad_accum: int, max_grad_norm: float) -> None:
    """Refuse a launch configuration whose accumulation or clipping differs from the trainer's; fill DeepSpeed's
    "auto" values (its micro-batch, accumulation and clipping) from the trainer's. Call before `prepare`."""
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise InputError(f"the accelerate launch configuration sets gradient accumulation to "
                         f"{accelerator.gradient_accumulation_steps}, but this run's is {grad_accum}: the effective "
                         "batch and the learning-rate schedule follow the trainer's --grad-accum. Drop "
                         "gradient_accumulation_steps from the accelerate config (or set it equal), or pass "
                         f"--grad-accum {accelerator.gradient_accumulation_steps}.")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    settings = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": float(max_grad_norm)}
    for key, value in wanted.items():
        given = settings.get(key, "auto")
        if given == "auto":
            settings[key] = value
        elif float(given) != float(value):
            option = {"train_micro_batch_size_per_gpu": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
                      "gradient_clipping": "--max-grad-norm"}[key]
            raise InputError(f"the DeepSpeed config sets {key} = {given}, but this run's {option} is {value}: set "
                             f"it to \"auto\" (filled from {option}) or to the same value.")


def no_fsdp(accelerator: Any, command: str, why: str) -> None:
    """Refuse FSDP for a trainer that runs its model outside the wrapper (FSDP's weights are shards there)."""
    if getattr(accelerator, "distributed_type", None) == "FSDP":  # accelerate's DistributedType is a str enum
        raise InputError(f"{command} does not run under FSDP: {why} Launch it with DDP or DeepSpeed ZeRO-2 "
                         "(examples/accelerate/ddp-8gpu.yaml, zero2-8gpu.yaml).")
