"""Weight converters (import torch/transformers checkpoints). Only this package imports torch and transformers."""
