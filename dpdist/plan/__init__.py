"""``dpdist plan``: what a run needs per rank (memory, FLOPs, communication, step time) before it starts.

The model is built on the ``meta`` device (shapes, no memory) for each tensor degree; the engine's own
strategy planner (``dpdist.privacy.strategy``) sizes the per-example norm buffers and the extra FLOPs;
the rest is arithmetic on those shapes.  ``shapes`` builds and measures the meta model, ``memory``
holds the byte model, ``cost`` the FLOPs, collective bytes and step time, ``hardware`` the devices,
``search`` the layouts worth listing and the smallest change that fits, ``report`` the output.
"""
