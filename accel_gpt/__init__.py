"""accel_gpt: a readable GPT-2 pretraining trainer built on Hugging Face Accelerate.

The same code trains on one CPU, several gloo processes, N GPUs or several machines; `accelerate launch` decides.
"""

from accel_gpt.inference import generate, load_model
from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.tokenizer import get_tokenizer

__all__ = ["GPTConfig", "GPTModel", "generate", "get_tokenizer", "load_model"]
__version__ = "0.1.0"
