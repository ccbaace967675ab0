"""The train state: step, parameters, optimizer state and non-trainable Flax collections."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds besides the input position.

    Attributes:
      step: int32 scalar, number of optimizer updates applied.
      params: the 'params' collection.
      opt_state: the optax state.
      flax_mutables: other Flax collections updated by training (e.g. codebook statistics); {} for LMs.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    flax_mutables: Any

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation) -> "TrainState":
        """From unboxed Flax variables: 'params' are optimised, every other collection is kept as mutables."""
        params = variables["params"]
        mutables = {k: v for k, v in variables.items() if k != "params"}
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), flax_mutables=mutables)

    def as_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "flax_mutables": self.flax_mutables}

    def replace_from_dict(self, d: dict) -> "TrainState":
        return self.replace(step=d["step"], params=d["params"], opt_state=d["opt_state"],
                            flax_mutables=d["flax_mutables"])
