"""The tests' tiny noisy training, shared by the in-process tests and the torchrun scripts."""
import torch


def noisy_sgd_step(engine, optimizer, sampler, data, step: int, before_release=None) -> None:
    """Step ``step``: its Poisson micro-batches of ``data`` (rows of seq_len + 1 tokens) through
    ``engine``, then ``before_release(engine, step)`` if given, the noisy release and the update."""
    for micro in sampler.plan(step).micro_batches:
        rows = data[micro.indices]
        engine.microbatch(rows[:, :-1], rows[:, 1:], micro.mask)
    if before_release is not None:
        before_release(engine, step)
    engine.release(step)
    optimizer.step()
    optimizer.zero_grad()


def noisy_sgd_run(engine, model, sampler, data, steps: int, lr: float, before_release=None) -> None:
    """Steps 0 to ``steps - 1`` of ``model`` under plain SGD at ``lr``, then the engine detached."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        noisy_sgd_step(engine, optimizer, sampler, data, step, before_release)
    engine.detach()
