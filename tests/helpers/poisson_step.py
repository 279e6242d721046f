"""One step of the tests' tiny noisy training, shared by the in-process tests and the torchrun scripts
(both put tests/dist on ``sys.path``)."""


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
