"""The model of a run, in one process at full shape, from its final weights or from a checkpoint.

``final/model.pt`` (``dpdist.train.loop.save_model``) is a full-shape state dict without vocabulary
padding, so it loads into ``build_model(cfg.model, tp_group=None)`` as it is (with the run's LoRA
adapters added first when it trained some: its names are the adapted model's).  A native checkpoint
folder (``checkpoints/step-*``) is read through DCP, which reshards any saved (data, tensor) layout to
this single process; only its ``model/`` entries are loaded, the optimizer state is left on disk.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..config import ConfigError, RunConfig
from ..model import build_model
from ..train.checkpoint import model_differences, read_record
from ..train.methods import transform_model
from ..train.plan import RunPlan
from ..train.reattention import reattention_of_finished_run


def load_model(cfg: RunConfig, weights: Path, device: torch.device):
    """The run's model in eval mode with ``weights`` (a state-dict file or a checkpoint folder) loaded."""
    reattention = None
    if cfg.reattention.enabled:  # the correction needs the run's sigma C, qN and its saved frequency release
        run_dir = Path(cfg.train.run_dir)
        reattention = reattention_of_finished_run(run_dir, cfg, RunPlan.load(run_dir / "plan.json"), device)
    model = transform_model(cfg, build_model(cfg.model, tp_group=None, device=device, reattention=reattention))
    if weights.is_dir():
        _load_checkpoint(model, weights, cfg)
    else:
        try:
            state = torch.load(weights, map_location=device)
            model.load_state_dict(state)
        except (RuntimeError, ValueError, OSError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise ConfigError(f"{weights} does not hold this run's model ({reason}); pass the run's final/model.pt "
                              "or a checkpoint") from None
    return model.eval()


def _load_checkpoint(model, folder: Path, cfg: RunConfig) -> None:
    record = read_record(folder)  # every file present and matching its checksum
    if record.get("backend", {}).get("name", "native") != "native":
        raise ConfigError(f"checkpoint {folder} holds DeepSpeed ZeRO partitions, which only DeepSpeed reads; "
                          "evaluate the run's final/model.pt instead")
    changed = model_differences(record, cfg)
    if changed:
        raise ConfigError(f"checkpoint {folder} holds a different model than {cfg.train.run_dir} "
                          f"({'; '.join(changed)}); pass a checkpoint of this run")
    state = {f"model/{name}": p.detach() for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # DCP warns that it 'assumes' a single process even when told so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
