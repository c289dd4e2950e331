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
# # metajax quick start: MAML on Omniglot
#
# Load Omniglot, look at a few 5-way 1-shot episodes, meta-train second-order MAML
# (Finn et al. 2017) for a short budget, evaluate it on held-out characters with a 95% confidence
# interval, and watch it adapt to one new episode.
#
# Everything here is the public `metajax` API; the notebook only wires it together.

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

# %% [markdown]
# ## Data
#
# The Omniglot archives (`images_background.zip` and `images_evaluation.zip`, from the official
# repository [brendenlake/omniglot](https://github.com/brendenlake/omniglot/tree/master/python))
# are read from the folder in `$METAJAX_OMNIGLOT_DIR`, else from `../shared/data/omniglot` beside
# the repository root when it is there. Nothing is downloaded unless asked: elsewhere (e.g. in
# Colab) set `DOWNLOAD = True` below, and `load_omniglot(..., download=True)` fetches the two
# archives (15 MB) into the user cache directory and checks their published sha256.
#
# (A TFDS-prepared Omniglot works too: replace `load_omniglot(OMNIGLOT_DIR, ...)` below by
# `mj.data.load_tfds_omniglot(tfds_data_dir, ...)`.) The preprocessed 28x28 images are cached, so
# later runs load in about a second.

# %%
import dataclasses
import os
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import metajax as mj

from tqdm.auto import trange  # a metajax dependency


SMOKE = os.environ.get("METAJAX_NOTEBOOK_SMOKE") == "1"  # CI: tiny budgets, same code
REPO_ROOT = Path.cwd().parent if Path.cwd().name == "colab" else Path.cwd()
SHARED_OMNIGLOT = REPO_ROOT.parent / "shared" / "data" / "omniglot"
OMNIGLOT_DIR = os.environ.get(mj.data.OMNIGLOT_DIR_ENV) or (
  str(SHARED_OMNIGLOT) if SHARED_OMNIGLOT.is_dir() else None)  # None: the download's folder
DOWNLOAD = False  # True: fetch the published archives if they are not there

# all 1623 characters; uint8 takes 4x less memory than float32
pool = mj.data.load_omniglot(OMNIGLOT_DIR, dtype=np.uint8, download=DOWNLOAD)
splits = mj.data.omniglot_split(pool, "finn")  # Finn et al.'s split; rotated train classes
print({name: split.num_classes for name, split in splits.items()}, "classes")
train_images = jax.device_put(splits["train"].images)  # [C, 20, 28, 28, 1], stays on device
test_images = jax.device_put(splits["test"].images)

# %% [markdown]
# ## Episodes
#
# An N-way K-shot episode (a `Task`) is a pure function of a PRNG key: N classes drawn at random
# and relabelled 0..N-1, K support and Q query images of each. Row j below is label j: its
# support image, then its query images.

# %%
WAYS, SHOTS = 5, 1
QUERIES = 2 if SMOKE else 5
sample_train = mj.data.make_episode_sampler(splits["train"], WAYS, SHOTS, QUERIES)
sample_test = mj.data.make_episode_sampler(splits["test"], WAYS, SHOTS, QUERIES)


def plot_episode(task, predictions=None, title=""):
  """Row j: the support images of label j, then its query images (titled with predictions)."""
  size = task.support_x.shape[1:3]
  support = np.asarray(task.support_x).reshape(WAYS, -1, *size)  # examples are label-major
  query = np.asarray(task.query_x).reshape(WAYS, -1, *size)
  shots, queries = support.shape[1], query.shape[1]
  fig, axes = plt.subplots(WAYS, shots + queries, squeeze=False, layout="constrained",
                           figsize=(1.2 * (shots + queries), 1.2 * WAYS))
  for j in range(WAYS):
    for i, image in enumerate([*support[j], *query[j]]):
      ax = axes[j, i]
      ax.imshow(image, cmap="gray_r", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_ylabel(f"label {j}")
      if i >= shots and predictions is not None:
        predicted = int(predictions[j * queries + i - shots])
        ax.set_title(f"says {predicted}", fontsize=9, color="green" if predicted == j else "red")
  fig.suptitle(title)
  plt.show()


key = jax.random.key(0)
init_key, train_key, test_key, show_key = jax.random.split(key, 4)
for i in range(2 if SMOKE else 3):
  plot_episode(sample_train(jax.random.fold_in(show_key, i), train_images),
               title=f"training episode {i}: support | queries")

# %% [markdown]
# ## Meta-training
#
# Second-order MAML: one inner gradient step of size 0.4 on each task's support set, then the
# query loss at the adapted parameters, averaged over a meta-batch of tasks and differentiated
# through the inner step (`jax.grad` of `metajax.meta_loss`). The step is jitted once; the
# meta-batch of step s comes from `fold_in(train_key, s)`.

# %%
FILTERS = 8 if SMOKE else 64
META_BATCH = 2 if SMOKE else 8
NUM_STEPS = 3 if SMOKE else 300  # a short budget; the paper trains for 60,000 steps
LOG_EVERY = 1 if SMOKE else 10

model = mj.conv4(WAYS, filters=FILTERS)
learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=0.4)
meta_step = mj.make_meta_step(learner, optax.adam(1e-3))
sample_batch = jax.jit(
  lambda key, images: mj.data.sample_meta_batch(sample_train, key, images, num_tasks=META_BATCH))

state = meta_step.init(model.init(init_key))
history = []
progress = trange(NUM_STEPS, desc="meta-training")
for step in progress:
  tasks = sample_batch(jax.random.fold_in(train_key, step), train_images)
  state, metrics = meta_step.step(state, tasks)
  if (step + 1) % LOG_EVERY == 0:  # fetching metrics waits for the device: not every step
    metrics = jax.device_get(metrics)
    history.append((step + 1, metrics["outer/query_loss"], metrics["outer/query_accuracy"]))
    progress.set_postfix(loss=f"{metrics['outer/query_loss']:.3f}",
                         accuracy=f"{metrics['outer/query_accuracy']:.2f}")

steps, losses, accuracies = zip(*history)
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3), layout="constrained")
ax_loss.plot(steps, losses)
ax_loss.set(xlabel="meta-training step", ylabel="query loss after adaptation")
ax_acc.plot(steps, accuracies)
ax_acc.set(xlabel="meta-training step", ylabel="query accuracy after adaptation")
plt.show()

# %% [markdown]
# ## Evaluation on held-out characters
#
# A fixed set of test episodes from the 423 characters never seen in training; three inner steps
# at test time, as in the paper. `metajax.evaluate` returns the mean and the half-width of the
# 95% confidence interval over tasks, before and after adaptation (before is chance: the classes
# of an episode are a random relabelling).

# %%
NUM_TEST_TASKS = 8 if SMOKE else 600
test_learner = dataclasses.replace(learner, num_inner_steps=3)
test_tasks = mj.data.sample_meta_batch(sample_test, test_key, test_images,
                                       num_tasks=NUM_TEST_TASKS)
results = mj.evaluate(test_learner, state.params, test_tasks, task_map=8)  # 8 tasks at a time
for name in ("accuracy_before", "accuracy_after"):
  r = results[name]
  print(f"{name.replace('_', ' ')}: {100 * r['mean']:.1f} +- {100 * r['ci95']:.1f} % "
        f"({r['num_tasks']} tasks, chance {100 / WAYS:.0f} %)")

# %% [markdown]
# ## Adapting to one new episode
#
# `learner.adapt` runs the inner loop on the support set alone; the adapted parameters then
# classify the query images (green: right, red: wrong).

# %%
task = jax.tree.map(lambda a: a[0], test_tasks)  # the first test episode
adapted_params = test_learner.adapt(state.params, task.support_x, task.support_y)
predictions = np.argmax(model.apply(adapted_params, task.query_x), axis=-1)
accuracy = np.mean(predictions == np.asarray(task.query_y))
plot_episode(task, predictions,
             title=f"held-out episode, support | queries: {100 * accuracy:.0f} % right")
