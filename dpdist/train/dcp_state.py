"""What DCP sees of a run: parameters, optimizer slots and component state as (DTensor) views.

Tensor-parallel shards are exposed to DCP as DTensor views of the *unpadded* full parameters, so a
checkpoint written at one (data, tensor) layout loads at another and DCP reshards.  Replicated tensors
are saved under one key (DCP writes them once).  Loading writes into the run's own tensors in place.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.distributed.checkpoint as dcp

from ..parallel.state import Sharded, unpadded_local_rows
from ..runtime.mesh import Mesh


class StateMismatch(ValueError):
    """The checkpoint's state does not fit this run's model, optimizer or components."""


@functools.lru_cache(maxsize=None)
def _device_mesh_of(device_type: str, dp_size: int, tp_size: int):
    """One DeviceMesh per process and layout (creating one makes process groups: never per save)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp_size, tp_size), mesh_dim_names=("data", "tensor"))


def _device_mesh(mesh: Mesh):
    if mesh.world_size == 1:
        return None
    return _device_mesh_of(mesh.device.type, mesh.dp_size, mesh.tp_size)


def _view(tensor: torch.Tensor, param: torch.nn.Parameter, device_mesh, sharded_mesh=None):
    """What DCP sees for ``tensor`` (the parameter itself or state sharded like it): a DTensor of the
    unpadded full shape for a tensor-parallel shard, the tensor itself otherwise.  A vocabulary
    table drops its padding rows, so the saved table is the same at every tensor degree.  A tensor
    FSDP shards over the data group (a DTensor) is viewed on ``sharded_mesh``, the (tensor, data)
    mesh, as its tensor-parallel shard split again along FSDP's dimension."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(tensor, DTensor):
        tp = Shard(param.partition_dim) if getattr(param, "tensor_model_parallel", False) else Replicate()
        placements, device_mesh, tensor = [tp, tensor.placements[0]], sharded_mesh, tensor.to_local()
    elif not getattr(param, "tensor_model_parallel", False):
        return tensor
    else:
        placements = [Replicate(), Shard(param.partition_dim)]
    full = list(getattr(param, "full_shape", param.shape))
    local = tensor
    if getattr(param, "unpadded_rows", None) is not None and getattr(param, "tensor_model_parallel", False):
        full[0] = param.unpadded_rows
        local = tensor.narrow(0, 0, unpadded_local_rows(param))
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(local, device_mesh, placements, run_check=False, shape=torch.Size(full), stride=stride)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (values are overwritten by the load): one step at lr 0
    with zero gradients, which leaves every parameter as it is."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _state(model, optimizer, device_mesh, components: list, sharded_mesh=None) -> dict:
    """What DCP saves: parameters, optimizer slots, and every component's ``state_dict()`` (tensors,
    or ``Sharded`` ones saved at their parameter's full shape), e.g. ANADP's importance state."""
    params = dict(model.named_parameters())
    state = {f"model/{name}": _view(p.detach(), p, device_mesh, sharded_mesh) for name, p in params.items()}
    by_param = {p: name for name, p in params.items()}
    for key, value in _component_state(components).items():
        state[key] = _view(value.tensor, value.like, device_mesh) if isinstance(value, Sharded) else value
    for p, slots in optimizer.state.items():
        name = by_param[p]
        for key, value in slots.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                state[f"optim/{name}/{key}"] = _view(value, p, device_mesh, sharded_mesh)
            else:  # a scalar such as Adam's step count: the same on every rank
                state[f"optim/{name}/{key}"] = value
    return state


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process even when told so (no_dist); that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _component_state(components: list) -> dict:
    state = {}
    for component in components:
        state.update(component.state_dict())
    return state


def save(folder, model, optimizer, components: list, mesh: Mesh, sharded_mesh=None) -> None:
    """Every rank writes its shards of the run's state into ``folder`` (a collective); ``sharded_mesh``:
    the (tensor, data) mesh of a model FSDP shards."""
    with _quiet_single_process():
        dcp.save(_state(model, optimizer, _device_mesh(mesh), components, sharded_mesh), checkpoint_id=str(folder),
                 no_dist=mesh.world_size == 1)


def load(folder, model, optimizer, components: list, mesh: Mesh, optimizer_name: str, sharded_mesh=None) -> None:
    """Load model, optimizer and components (resharded to this run's layout) in place; a checkpoint
    that lacks some of that state or cannot be read is a ``StateMismatch`` that says what to do."""
    _init_optimizer_state(optimizer)
    state = _state(model, optimizer, _device_mesh(mesh), components, sharded_mesh)
    saved = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    missing = sorted(set(state) - saved)
    if missing:
        raise StateMismatch(f"checkpoint {folder} lacks {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
                            + f": it was saved with another optimizer or model (train.optimizer is "
                            f"{optimizer_name!r}); resume with the config it was saved with")
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(folder), no_dist=mesh.world_size == 1)
    except Exception as exc:  # DCP's own errors name tensors and offsets, not what the user should do
        raise StateMismatch(f"checkpoint {folder} could not be loaded ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300]}); resume from an older checkpoint") from exc
    params = dict(model.named_parameters())
    by_param = {p: name for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            _copy_back(p, state[f"model/{name}"])
        for p, slots in optimizer.state.items():
            for key in slots:
                value = state[f"optim/{by_param[p]}/{key}"]
                if torch.is_tensor(slots[key]) and slots[key].shape == p.shape:
                    _copy_back(slots[key], value)
                else:
                    slots[key] = value
    for component in components:  # each puts the loaded values into its own tensors
        component.load_state_dict({key: _local(state[key]) for key in component.state_dict()})


def _local(loaded):
    """This rank's part of a loaded view (a DTensor's local shard, else the value itself)."""
    return loaded.to_local() if hasattr(loaded, "to_local") else loaded


def _copy_back(target: torch.Tensor, loaded) -> None:
    """Put a loaded view's values into ``target`` (the padded rows of a vocabulary table keep theirs)."""
    local, target = _local(loaded), _local(target)
    if local.data_ptr() != target.data_ptr():
        target.narrow(0, 0, local.shape[0]).copy_(local)
