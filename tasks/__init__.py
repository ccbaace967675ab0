"""seqio task definitions, installed as `musiclm_jax.tasks`. Importing this package registers every task."""
from musiclm_jax.tasks import synthetic  # noqa: F401  (registers the synthetic token tasks)
