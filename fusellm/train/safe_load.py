"""DeepSpeed checkpoints load without pickle: ``install()`` before a ZeRO resume.

DeepSpeed (0.19) resumes ``checkpoint-N/global_step*/*_states.pt`` through its checkpoint
engine's ``load``, which for ``TorchCheckpointEngine`` is ``torch.load(weights_only=False)``:
a pickle payload offered as a checkpoint would run. ``install()`` replaces that method (and
the same one of the Fast/Decoupled engines, which a DeepSpeed config can select) with
``torch.load(weights_only=True)``, scoped to an allowlist of the only non-torch globals
real ZeRO-2/ZeRO-3 CPU checkpoints contain. Anything else raises
``pickle.UnpicklingError`` before it runs. The allowlisted classes are plain data, rebuilt
without calling their code (``__new__`` plus ``__dict__`` update, or an enum value lookup):

* ``deepspeed.runtime.fp16.loss_scaler.LossScaler``: the optimizer's static loss scale (a
  float, a flag, a dtype); ``DynamicLossScaler`` (fp16 runs, GPU only): the same plus the
  scale schedule's counters and factors (numbers only; not exercised on CPU here).
* ``deepspeed.runtime.zero.config.ZeroStageEnum``: an ``int`` enum, the ZeRO stage.
* ``deepspeed.utils.tensor_fragment.fragment_address``: a dataclass of two ints (ZeRO-2).

Universal-checkpoint loading (``load_universal`` in
the DeepSpeed config) keeps DeepSpeed's own ``torch.load`` calls and is not covered.
"""

from __future__ import annotations


def _allowlist() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_load(self, path: str, map_location=None):
    import torch

    with torch.serialization.safe_globals(_allowlist()):
        return torch.load(path, map_location=map_location, weights_only=True)


def install() -> None:
    """Make DeepSpeed's checkpoint engines load with ``weights_only=True`` (idempotent)."""
    import importlib

    engines = [
        ("torch_checkpoint_engine", "TorchCheckpointEngine"),
        ("fast_checkpoint_engine", "FastCheckpointEngine"),
        ("decoupled_checkpoint_engine", "DecoupledCheckpointEngine"),
    ]
    for module, name in engines:
        try:  # older DeepSpeed releases lack the fast/decoupled engines
            mod = importlib.import_module(f"deepspeed.runtime.checkpoint_engine.{module}")
        except ImportError:
            continue
        getattr(mod, name).load = _safe_load
