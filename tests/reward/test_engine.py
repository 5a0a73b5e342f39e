"""A launch configuration that disagrees with the trainer's accumulation or clipping is refused before any model
loads; DeepSpeed's "auto" values are filled from the trainer's options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lpo.core.errors import InputError
from lpo.reward import engine


def _accelerator(accumulation: int, deepspeed: dict | None = None) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=deepspeed) if deepspeed is not None else None
    return SimpleNamespace(gradient_accumulation_steps=accumulation, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_auto_values_are_filled_from_the_trainer() -> None:
    settings = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 2}}
    engine.agree(_accelerator(4, settings), micro_batch=16, grad_accum=4, max_grad_norm=0.5)
    assert settings == {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 4,
                        "gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}
    same = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5}
    engine.agree(_accelerator(4, same), micro_batch=16, grad_accum=4, max_grad_norm=0.5)  # equal: accepted
    engine.agree(_accelerator(1), micro_batch=16, grad_accum=1, max_grad_norm=1.0)  # DDP, no DeepSpeed


@pytest.mark.parametrize("key, value, option", [("train_micro_batch_size_per_gpu", 8, "--batch-size"),
                                                 ("gradient_clipping", 1.0, "--max-grad-norm")])
def test_deepspeed_values_that_differ_are_refused(key: str, value: float, option: str) -> None:
    with pytest.raises(InputError, match=f"{key} = {value}.*{option}"):
        engine.agree(_accelerator(1, {key: value}), micro_batch=16, grad_accum=1, max_grad_norm=0.5)


def test_an_accumulation_set_by_the_launch_is_refused_not_applied(monkeypatch, tmp_path) -> None:
    """`accelerate launch --gradient_accumulation_steps 16` (or a config file's) reaches the trainer as an environment
    variable that accelerate lets override the trainer's own: the reference LRM's effective batch went 16x this way."""
    from accelerate import Accelerator

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "16")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=1)
    assert accelerator.gradient_accumulation_steps == 16  # what accelerate alone would train with
    with pytest.raises(InputError, match="sets gradient accumulation to 16, but this run's is 1.*--grad-accum 16"):
        engine.agree(accelerator, micro_batch=16, grad_accum=1, max_grad_norm=1.0)
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    Accelerator(cpu=True)  # leave accelerate's shared gradient state as the other tests expect it


def test_lpo_refuses_fsdp() -> None:
    from accelerate.utils import DistributedType

    with pytest.raises(InputError, match="lpo optimize does not run under FSDP.*ddp-8gpu.yaml"):
        engine.no_fsdp(SimpleNamespace(distributed_type=DistributedType.FSDP), "lpo optimize", "reason.")
    engine.no_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), "lpo optimize", "reason.")
