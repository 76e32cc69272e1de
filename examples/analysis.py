# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Analysing an accel_gpt run
#
# A notebook (jupytext percent format: open it in Jupyter with jupytext installed, or run it as a script) that
# loads a run made by `accelerate launch -m accel_gpt.train`, plots its losses and learning rate, generates
# text from its newest checkpoint, measures perplexity, and compares two runs.
#
# Set `ACCEL_GPT_RUN` (and optionally `ACCEL_GPT_COMPARE`) to run directories; by default it takes the two
# newest runs under `runs/`. Figures are saved to `ACCEL_GPT_FIGURES` (default `figures/`).

# %%
import os
from pathlib import Path

from accel_gpt import analysis

runs = sorted(Path("runs").glob("*"), key=lambda p: p.stat().st_mtime)
run_dir = Path(os.environ.get("ACCEL_GPT_RUN") or runs[-1])
compare_dir = os.environ.get("ACCEL_GPT_COMPARE") or (runs[-2] if len(runs) > 1 else None)
figures = Path(os.environ.get("ACCEL_GPT_FIGURES", "figures"))
figures.mkdir(parents=True, exist_ok=True)

run = analysis.load_run(run_dir)
print(run.name, "|", len(run.metrics), "steps |", [p.name for p in run.checkpoints])
run.metrics.tail()

# %% [markdown]
# ## Losses and learning rate
# Training loss at every step, the evaluated train and validation loss, and tokens seen on the top axis.

# %%
analysis.plot_losses(run, path=figures / "losses.png")

# %%
analysis.plot_lr(run, path=figures / "lr.png")

# %% [markdown]
# ## The model
# `load_model` reads the newest complete checkpoint (sizes and hashes verified, safetensors only).

# %%
model = analysis.load_model(run_dir)
print(analysis.generate(model, "Every effort moves you", max_new_tokens=30))
print(analysis.generate(model, "Every effort moves you", max_new_tokens=30, temperature=0.8, top_k=40, seed=1))

# %%
# A data path (bundled name, file, directory or glob) is tokenized as training does, in the run's data cache.
ppl = analysis.perplexity(model, "the-verdict", data_cache_dir=run.config.get("data_cache_dir"))
print(f"perplexity on The Verdict: {ppl:.1f}")

# %% [markdown]
# ## Comparing runs
# Validation loss of several runs on one figure, against tokens seen (fair across batch sizes).

# %%
if compare_dir is not None:
    other = analysis.load_run(compare_dir)
    analysis.plot_losses([run, other], x="tokens_seen", path=figures / "compare.png")

# %% [markdown]
# ## Training from a notebook
# `train` takes the same `TrainConfig` as the command line. For several processes, use Accelerate's
# `notebook_launcher` (on CPU, processes join a gloo group; on GPUs, one process per GPU):
#
# ```python
# from accelerate import notebook_launcher
# from accel_gpt.train import train
# from accel_gpt.config import TrainConfig
#
# cfg = TrainConfig(model="tiny", max_steps=50, output_dir="runs/from-notebook")
# notebook_launcher(train, (cfg,), num_processes=2)
# ```
