"""Install musiclm_jax.

The pins are the set verified to install together on Python 3.11 (see README, "Install").
Extras:
  test     pytest and the references the tests compare against (scipy, scikit-learn)
  tpu      libtpu, so that `python -m musiclm_jax.aot` can compile for TPU topologies on a CPU machine
  convert  torch (CPU build), transformers and torchvggish (with resampy), used only by the weight converters and
           their tests
  beam     Apache Beam's requirements, for preparing datasets on Beam (python -m musiclm_jax.prepare); apache-beam
           itself is installed by launch/setup_env.sh without its own pins (it declares protobuf<7, which the pinned
           stack cannot use: sentencepiece's generated code needs protobuf 7; Beam runs on 7, tests/test_prepare.py)
"""
import setuptools

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "librosa==0.11.0",
    "soundfile==0.14.0",
    "gin-config==0.5.0",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "pydub==0.25.1",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "importlib_resources==6.5.2",  # tensorflow-datasets imports it for builders defined in packages
]

EXTRAS = {
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "scipy==1.17.1", "scikit-learn==1.9.1"],
    "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
    "convert": ["torch==2.13.0", "transformers==5.24.0", "torchvggish==0.2", "resampy==0.4.3"],
    "beam": ["fastavro==1.13.1", "fasteners==0.20", "httplib2==0.32.1", "jsonpickle==4.1.4", "objsize==0.7.1",
             "proto-plus==1.29.0", "pymongo==4.20.1", "python-dateutil==2.9.0.post0", "pytz==2026.6",
             "sortedcontainers==2.4.0", "zstandard==0.25.0", "beartype==0.22.9", "cryptography==51.0.1",
             "pyarrow==25.0.1"],
}
APACHE_BEAM = "apache-beam==2.78.0"  # installed by launch/setup_env.sh with --no-deps (see the `beam` extra)

setuptools.setup(
    name="musiclm_jax",
    version="0.1.0",
    description="MusicLM (text to music) in JAX/Flax for TPU pods",
    python_requires=">=3.11,<3.12",
    # `gin/` (gin files) lives at the top of the repository and is installed as musiclm_jax.gin, so an installed
    # package carries it.
    packages=(["musiclm_jax"] + ["musiclm_jax." + p for p in setuptools.find_packages("musiclm_jax")]
              + ["musiclm_jax.gin"]),
    package_dir={"musiclm_jax": "musiclm_jax", "musiclm_jax.gin": "gin"},
    package_data={"musiclm_jax.gin": ["*.gin", "*/*.gin", "*/*/*.gin"], "musiclm_jax.kernels": ["*.cc"]},
    install_requires=CORE,
    extras_require=EXTRAS,
)
