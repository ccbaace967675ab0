"""seqio task definitions, installed as `musiclm_jax.tasks`. Importing this package registers the fixed tasks;
raw-audio and stage tasks are registered on first use by name (`get_or_register`)."""
import seqio

from musiclm_jax.data import stages
from musiclm_jax.tasks import audio, synthetic, tokenized  # noqa: F401  (synthetic registers its token tasks)


def get_or_register(name: str):
    """The registered task or mixture `name`, registering a raw-audio task from its name if needed."""
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        return seqio.get_mixture_or_task(name)
    if name.startswith(("synthetic_music_", "audio_folder_", "musiccaps_")):
        return audio.register_raw_audio_task(name)
    if name.startswith(tuple(f"{stage}_stage:" for stage in stages.STAGES)):
        return tokenized.register_stage_task(name)
    return seqio.get_mixture_or_task(name)  # raises, naming the known tasks
