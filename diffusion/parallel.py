"""Data parallelism: one train step compiled over a mesh of devices, on one host or many.

The batch is a global ``jax.Array`` sharded along its first axis over a one-axis device mesh
(``DATA_AXIS``) and the train state is replicated, whatever the number of devices and processes.
Two ways to compile the same step:

* 'jit' (default): ``jax.jit`` with ``NamedSharding``s; XLA partitions the step and inserts the
  gradient all-reduce. Random draws made from the step key are those of one device (JAX's
  threefry-partitionable keys do not depend on the sharding), so this path gives the single-device
  numbers up to summation order.
* 'shard_map': ``jax.shard_map`` runs the step per device on its shard of the batch, with an
  explicit ``lax.pmean`` of loss, metrics and gradients over ``DATA_AXIS``; each device draws its
  own noise from ``fold_in(step key, device index)``. This is the semantics of the legacy
  ``jax.pmap`` data-parallel step, written on the same global arrays as the jit path, so
  checkpoints, snapshots and logs never see a device axis.

Several hosts: ``initialize_distributed`` connects the processes (``jax.distributed``); then
``jax.devices()`` lists every process's devices, the mesh spans them all, and each process hands
``put_batch`` its own rows of the global batch (``diffusion.data`` gives them out by process index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "PARALLELISMS",
    "DataParallelStep",
    "initialize_distributed",
    "make_global_batch",
]

PARALLELISMS = ("jit", "shard_map")
DATA_AXIS = "data"  # the mesh axis along which the batch is sharded

State = Any
Batch = Any
Metrics = dict[str, jax.Array]
TrainStep = Callable[..., tuple[State, Metrics]]


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """Connect this process to the others with ``jax.distributed.initialize``; return
    (process_index, process_count).

    Call before any other JAX computation. Arguments left None are detected from the cluster
    environment where JAX knows it (SLURM, Open MPI, Cloud TPU, Kubernetes, ...). CPU devices
    exchange data through gloo, so the same code runs on several CPU processes (as the tests do).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return jax.process_index(), jax.process_count()


def make_global_batch(local_batch: Batch, sharding: jax.sharding.Sharding) -> Batch:
    """The global batch (jax.Arrays laid out by ``sharding``) from this process's rows.

    Process p holds rows [p B/P, (p + 1) B/P) of every sharded axis (as ``diffusion.data`` hands
    them out); with one process this is a ``device_put`` that splits the batch across devices.
    """
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
        local_batch,
    )


def _leading_size(batch: Batch, axis: int) -> int:
    sizes = {np.shape(leaf)[axis] for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the size of axis {axis}: {sorted(sizes)}")
    return sizes.pop()


class DataParallelStep:
    """``train_step(state, batch, *, axis_name=None) -> (state, metrics)`` compiled for a mesh.

    ``parallelism`` is 'jit' or 'shard_map' (module docstring); ``devices`` defaults to
    ``jax.devices()`` (every device of every process). ``step`` runs one update, ``multi_step`` k
    updates in one ``lax.scan`` on a stack of k batches. The state argument is donated: after
    ``step(state, ...)`` use only the returned state.
    """

    def __init__(
        self,
        train_step: TrainStep,
        *,
        parallelism: str = "jit",
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        if parallelism not in PARALLELISMS:
            raise ValueError(
                f"unknown parallelism {parallelism!r}; accepted: {', '.join(PARALLELISMS)}"
            )
        self.parallelism = parallelism
        self.devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
        self.state_sharding = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.stacked_batch_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))

        if parallelism == "shard_map":
            per_device_step = jax.shard_map(
                lambda state, batch: train_step(state, batch, axis_name=DATA_AXIS),
                mesh=self.mesh,
                in_specs=(P(), P(DATA_AXIS)),
                out_specs=P(),
            )
        else:
            per_device_step = train_step

        def multi_step(state, batches):
            return lax.scan(per_device_step, state, batches)

        compile_for = lambda fn, batch_sharding: jax.jit(  # noqa: E731
            fn,
            in_shardings=(self.state_sharding, batch_sharding),
            out_shardings=self.state_sharding,
            donate_argnums=0,
        )
        self._step = compile_for(per_device_step, self.batch_sharding)
        self._multi_step = compile_for(multi_step, self.stacked_batch_sharding)

    @property
    def num_local_devices(self) -> int:
        """Number of mesh devices this process feeds (its rows of the batch are split across them)."""
        process_index = jax.process_index()
        return sum(device.process_index == process_index for device in self.devices)

    def put_state(self, state: State) -> State:
        """A copy of ``state`` replicated over the mesh (the step donates what it is given).

        Leaves already replicated over this mesh (a restored state) are copied on the devices;
        others (a fresh state, the same value in every process) go through the host, which is
        how a value reaches devices of other processes.
        """

        def replicate(leaf):
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                data = replicate(jax.random.key_data(leaf))
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
            if isinstance(leaf, jax.Array) and leaf.sharding == self.state_sharding:
                return jnp.copy(leaf)  # never alias the caller's buffers: the step donates
            host = np.asarray(jax.device_get(leaf))
            return jax.make_array_from_callback(
                host.shape, self.state_sharding, lambda index: host[index]
            )

        return jax.tree.map(replicate, state)

    def put_batch(self, local_batch: Batch, *, stacked: bool = False) -> Batch:
        """This process's rows (B_local, ...) as the global batch sharded over the mesh;
        ``stacked``: a stack (k, B_local, ...) of k consecutive batches for ``multi_step``."""
        local_size = _leading_size(local_batch, 1 if stacked else 0)
        if local_size % self.num_local_devices:
            raise ValueError(
                f"the per-process batch size {local_size} is not divisible by the "
                f"{self.num_local_devices} devices of this process"
            )
        sharding = self.stacked_batch_sharding if stacked else self.batch_sharding
        return make_global_batch(local_batch, sharding)

    def step(self, state: State, batch: Batch) -> tuple[State, Metrics]:
        """One update of a placed state on a placed batch; metrics are scalars."""
        return self._step(state, batch)

    def multi_step(self, state: State, batches: Batch) -> tuple[State, Metrics]:
        """k updates in one compiled call (``lax.scan``) on a placed stack of k batches; metrics
        are stacked along a leading (k,) axis. Equals k calls of ``step``."""
        return self._multi_step(state, batches)

    def global_batch_size(self, local_batch: Batch) -> int:
        """The number of examples in the global batch of which ``local_batch`` is this process's part."""
        return _leading_size(local_batch, 0) * jax.process_count()
