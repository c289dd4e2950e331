# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MAML vs joint pre-training on sine waves
#
# The regression experiment of Finn et al. (2017), section 5.1 and figure 2. A task is a sine wave
# `y = A sin(x - b)` with amplitude A ~ U[0.1, 5] and phase b ~ U[0, pi], seen through K = 10
# points with x ~ U[-5, 5]. Two initialisations of the same small network (1 -> 40 -> 40 -> 1,
# ReLU) are fine-tuned on a new task with a few SGD steps:
#
# * **MAML** meta-learns the initialisation so that one gradient step on the K points fits the task;
# * **pre-training** fits one network to the points of all training tasks pooled together (a
#   joint-training baseline). With phases spread over [0, pi], it learns roughly the average
#   function, and a few gradient steps hardly move it.
#
# No data files are needed: tasks are sampled from a PRNG key.

# %% [markdown]
# ## Install
#
# Where metajax is importable already (CI, an environment set up with `pip install -e .`) this
# cell does nothing. Run from a checkout of metajax (this notebook in its `colab/` folder), it
# installs that checkout with its dependencies. Anywhere else, e.g. in Colab, set
# `METAJAX_SOURCE` below to where metajax comes from, a path to a checkout or a `git+https` URL
# of its repository (anything `pip install` takes), or clone the repository and open the notebook
# from its `colab/` folder.

# %%
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

METAJAX_SOURCE = ""  # elsewhere: a checkout's path, or a git+https URL of the repository

if importlib.util.find_spec("metajax") is None:
  checkout = next((p for p in (Path.cwd(), Path.cwd().parent)
                   if (p / "pyproject.toml").is_file() and (p / "metajax").is_dir()), None)
  source = METAJAX_SOURCE or (str(checkout) if checkout else "")
  if not source:
    raise RuntimeError("metajax is not installed and this notebook is not inside a metajax "
                       "checkout: set METAJAX_SOURCE in this cell to a checkout's path or a "
                       "git+https URL of the repository, then run the cell again")
  local = Path(source).expanduser().is_dir()
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         *(["-e"] if local else []), source])
  if local:  # this kernel started before the editable install's path hook existed
    sys.path.insert(0, str(Path(source).expanduser().resolve()))
  importlib.invalidate_caches()

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import metajax as mj
from metajax.algorithms import pretrain

from tqdm.auto import trange  # a metajax dependency


SMOKE = os.environ.get("METAJAX_NOTEBOOK_SMOKE") == "1"  # CI: tiny budgets, same code

SHOTS = 10  # K points per task, for the support and for the query set
META_BATCH = 25  # tasks per meta-batch, as Finn et al.
INNER_LR = 0.01  # the fine-tuning (inner) step size, as Finn et al.
META_LR = 1e-3
NUM_STEPS = 20 if SMOKE else 20_000  # Finn et al. train for 70,000 steps
LOG_EVERY = 5 if SMOKE else 250

# %% [markdown]
# ## Training both initialisations on the same tasks
#
# MAML's step is `metajax.make_meta_step` (second order, one inner step, MSE); the pre-training
# step is `metajax.algorithms.pretrain.make_pretrain_step` on the support and query points of the same
# meta-batch pooled into one regression minibatch (`pretrain.tasks_to_batch`).

# %%
model = mj.mlp(1, hidden=(40, 40))
init_key, train_key, plot_key, test_key = jax.random.split(jax.random.key(0), 4)
params = model.init(init_key)

sample = mj.data.make_sinusoid_sampler(SHOTS, SHOTS)
sample_batch = jax.jit(lambda key: mj.data.sample_meta_batch(sample, key, num_tasks=META_BATCH))
to_batch = jax.jit(pretrain.tasks_to_batch)

maml = mj.make_meta_step(mj.MAML(model.apply, mj.mse, num_inner_steps=1, inner_lr=INNER_LR),
                         optax.adam(META_LR))
joint = pretrain.make_pretrain_step(pretrain.supervised_objective(model.apply, mj.mse),
                                    optax.adam(META_LR))
maml_state, joint_state = maml.init(params), joint.init(params)

progress = trange(NUM_STEPS, desc="training")
for step in progress:
  tasks = sample_batch(jax.random.fold_in(train_key, step))
  maml_state, maml_metrics = maml.step(maml_state, tasks)
  joint_state, joint_metrics = joint.step(joint_state, to_batch(tasks))
  if (step + 1) % LOG_EVERY == 0:
    progress.set_postfix(maml_query_mse=f"{float(maml_metrics['outer/query_loss']):.3f}",
                         pretrained_mse=f"{float(joint_metrics['outer/loss']):.3f}")

initialisations = {"MAML": maml_state.params, "pre-trained": joint_state.params}

# %% [markdown]
# ## The curves after 0, 1 and 10 gradient steps (Finn et al., figure 2)
#
# Both initialisations are fine-tuned on the same K = 10 points of a new task, with SGD of step
# size 0.01 on the MSE (`pretrain.sinusoid_comparison`).

# %%
comparison = pretrain.sinusoid_comparison(plot_key, model.apply, initialisations, shots=SHOTS,
                                          inner_lr=INNER_LR, steps=(0, 1, 10))
STYLES = {0: ("pre-update", ":", "tab:green"), 1: ("1 grad step", "--", "tab:olive"),
          10: ("10 grad steps", "-", "tab:blue")}

fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True, layout="constrained")
for ax, (name, predictions) in zip(axes, comparison.predictions.items()):
  ax.plot(comparison.x, comparison.y_true, color="tab:red", label="ground truth")
  for steps, curve, mse in zip(comparison.steps, predictions, comparison.mse[name]):
    label, style, color = STYLES[steps]
    ax.plot(comparison.x, curve, style, color=color, label=f"{label} (MSE {float(mse):.2f})")
  ax.plot(comparison.support_x, comparison.support_y, "^", color="purple",
          label=f"{SHOTS} points used for the gradient")
  ax.set(title=f"{name}, K={SHOTS}", xlabel="x")
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
axes[0].set_ylabel("y")
plt.show()

# %% [markdown]
# ## Error over many new tasks
#
# The mean query MSE over held-out tasks after 0..10 SGD steps on each task's K points
# (`pretrain.adaptation_mse`): MAML's single step already beats every step count of the
# pre-trained network.

# %%
NUM_TEST_TASKS = 20 if SMOKE else 500
test_tasks = mj.data.sample_meta_batch(sample, test_key, num_tasks=NUM_TEST_TASKS)
fig, ax = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
for name, init in initialisations.items():
  mse = pretrain.adaptation_mse(model.apply, init, test_tasks, inner_lr=INNER_LR, num_steps=10)
  ax.plot(np.arange(11), mse, "o-", label=name)
  print(f"{name}: query MSE {float(mse[0]):.3f} before, {float(mse[1]):.3f} after 1 step, "
        f"{float(mse[10]):.3f} after 10 steps ({NUM_TEST_TASKS} tasks)")
ax.set(xlabel="gradient steps on the K points", ylabel="query MSE", yscale="log")
ax.legend()
plt.show()
