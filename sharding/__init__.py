"""Meshes, logical-axis rules, sharded state, expert parallelism and multi-host start-up.

    parallel = make_parallel(ParallelConfig(fsdp=2, expert=4, rules=Rules.FSDP_EP))
    cfg = parallel.configure(cfg)  # the model lays itself out by the preset's rules
    state, shardings = init_state_sharded(cfg, optimizer, rng, parallel)
    step = jax.jit(make_train_step(cfg, ...))
    with parallel.activate():  # trace and run jitted model code under the mesh
        state, metrics = step(state, global_batch(parallel, local_batch))

Only this package knows mesh axis names (`data`, `fsdp`, `expert`, `tensor`); the model names
its axes logically and `sharding.rules` maps one onto the other. The MoE layer's
expert-parallel exchange is the model's (model/expert_parallel.py, MoEConfig.ep_exchange).
Import the submodules directly (`from sharding.mesh import ...`).
"""
