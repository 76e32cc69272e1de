"""accel_gpt: a readable GPT-2 pretraining trainer built on Hugging Face Accelerate.

The same code trains on one CPU, several gloo processes, N GPUs or several machines; `accelerate launch` decides.
"""

from accel_gpt.model import GPTConfig, GPTModel
from accel_gpt.tokenizer import get_tokenizer

__all__ = ["GPTConfig", "GPTModel", "generate", "get_tokenizer", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # generate and load_model come from accel_gpt.inference, which imports the data and cache modules: imported
    # on first use, so that `python -m accel_gpt.cache` does not find its own module loaded already.
    if name in ("generate", "load_model"):
        from accel_gpt import inference

        return getattr(inference, name)
    from accel_gpt.compat import old_name  # names of earlier releases

    return old_name(__name__, name)
