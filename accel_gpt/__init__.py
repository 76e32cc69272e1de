"""accel_gpt: a readable GPT-2 pretraining trainer built on Hugging Face Accelerate.

The same code trains on one CPU, several gloo processes, N GPUs or several machines; `accelerate launch` decides.
"""

from accel_gpt.model import GPTConfig, GPTModel, generate, generate_text
from accel_gpt.tokenizer import get_tokenizer

__all__ = ["GPTConfig", "GPTModel", "generate", "generate_text", "get_tokenizer"]
__version__ = "0.1.0"
