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
# # The zeroing trick: MAML is a noisy contrastive learner
#
# Kao, Chiu and Chen, "MAML is a Noisy Contrastive Learner in Classification" (ICLR 2022), show
# that when only the linear head w adapts in the inner loop, the meta-gradient MAML sends to the
# encoder phi is the gradient of a supervised contrastive loss plus a noise term:
#
# $$L = \eta\, \mathbb{E}_{(s,t)\sim S}\big[(q_t - 1_{t=u})\big]\,\langle \phi(s), \phi(q)\rangle
# \;+\; \text{noise},$$
#
# where q is the adapted head's prediction on a query image of class u, and the noise comes from
# the initial head w (it is proportional to w) and from the support predictions of the unadapted
# head. The **zeroing trick** sets w = 0 before every inner loop: with one inner step the noise
# vanishes, the encoder is trained by the pure contrastive loss (pull a query towards the support
# images of its class, push it away from the others), and accuracy improves.
#
# This notebook (1) trains MAML with and without the zeroing trick, first- and second-order, on
# the same tasks and plots test accuracy along training; (2) splits the encoder gradient into its
# contrastive part and its noise with `metajax.analysis.theory.decompose_encoder_gradient`, and (3) tracks
# how similar the encoder's features of same-class and different-class images become
# (`metajax.analysis.theory.feature_similarity`).

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
# `mj.data.load_tfds_omniglot(tfds_data_dir, ...)`.)
#
# We use Kao et al.'s setting: their split (the first 1200 characters train, the other 423 test,
# no rotations), their 4-layer strided network (`metajax.kao_conv`), 5-way 1-shot episodes,
# cross-entropy, one inner step of size 0.4, Adam 1e-3.

# %%
import functools
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

pool = mj.data.load_omniglot(OMNIGLOT_DIR, dtype=np.uint8, download=DOWNLOAD)
splits = mj.data.omniglot_split(pool, "kao")
train_images = jax.device_put(splits["train"].images)
test_images = jax.device_put(splits["test"].images)

WAYS, SHOTS = 5, 1
QUERIES = 2 if SMOKE else 5
FILTERS = 8 if SMOKE else 64
META_BATCH = 2 if SMOKE else 16
NUM_STEPS = 2 if SMOKE else 300  # per variant; Kao et al. train for 3000 steps
MEASURE_EVERY = 1 if SMOKE else 25
NUM_TEST_TASKS = 4 if SMOKE else 200
NUM_GRAD_TASKS = 2 if SMOKE else 16
INNER_LR, META_LR = 0.4, 1e-3
TEST_INNER_STEPS = 3

init_key, train_key, test_key, grad_key = jax.random.split(jax.random.key(0), 4)
sample_train = mj.data.make_episode_sampler(splits["train"], WAYS, SHOTS, QUERIES)
sample_test = mj.data.make_episode_sampler(splits["test"], WAYS, SHOTS, QUERIES)
sample_batch = jax.jit(
  lambda key, images: mj.data.sample_meta_batch(sample_train, key, images, num_tasks=META_BATCH))
# Fixed task sets, the same for every variant and every measurement.
test_tasks = mj.data.sample_meta_batch(sample_test, test_key, test_images, num_tasks=NUM_TEST_TASKS)
grad_tasks = mj.data.sample_meta_batch(sample_train, grad_key, train_images,
                                       num_tasks=NUM_GRAD_TASKS)

# %% [markdown]
# ## Four learners, one initialisation, the same tasks
#
# `metajax.with_zeroing` composes the trick onto any learner: the head is zeroed inside the
# differentiated function, before the inner loop and before any prediction.

# %%
model = mj.kao_conv(WAYS, filters=FILTERS)
params = model.init(init_key)


def make_learner(first_order, zeroing):
  learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=INNER_LR,
                    first_order=first_order)
  return mj.with_zeroing(learner) if zeroing else learner


learners = {
  "FOMAML": make_learner(first_order=True, zeroing=False),
  "FOMAML + zeroing": make_learner(first_order=True, zeroing=True),
  "MAML": make_learner(first_order=False, zeroing=False),
  "MAML + zeroing": make_learner(first_order=False, zeroing=True),
}

# %% [markdown]
# ## What we measure along training
#
# Every measurement starts from `learner.model_params(meta_params)`: the parameters the inner loop
# starts from (the head zeroed for the zeroing variants). So one compiled function of each kind
# serves all four learners:
#
# * **test accuracy** after `TEST_INNER_STEPS` inner steps on held-out characters
#   (`metajax.evaluate_tasks`; the test-time inner loop is the same for first- and second-order
#   learners);
# * **the gradient split** on fixed training tasks: `metajax.analysis.theory.decompose_encoder_gradient`
#   gives the encoder gradient as contrastive part + noise. It is exact for the head-only inner
#   loop of the theory (ANIL); we evaluate it at the parameters each MAML run has reached. With the
#   zeroing trick and one inner step the noise is 0 up to round-off (to train the ANIL learners
#   themselves and take the same measurements, see `metajax.analysis.gradient_noise.measure_during_training`
#   and `experiments/gradient_noise.py`);
# * **feature similarity**: the mean cosine similarity of the encoder features of same-class and
#   of different-class pairs of images in the held-out episodes
#   (`metajax.analysis.gradient_noise.task_feature_similarity`, over `metajax.analysis.theory.feature_similarity`).

# %%
test_learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=TEST_INNER_STEPS,
                       inner_lr=INNER_LR)
evaluate = jax.jit(functools.partial(mj.evaluate_tasks, test_learner))


@functools.partial(jax.jit, static_argnames="first_order")
def gradient_split(start_params, tasks, first_order):
  split = mj.analysis.theory.decompose_encoder_gradient(
    model.features, start_params, tasks, inner_lr=INNER_LR, loss="cross_entropy",
    first_order=first_order)
  return {k: split[k] for k in ("cosine", "total_norm", "contrastive_norm", "noise_norm")}


class_similarity = jax.jit(
  functools.partial(mj.analysis.gradient_noise.task_feature_similarity, model.features))


def measure(learner, meta_params, step):
  start_params = learner.model_params(meta_params)
  accuracy, ci95 = mj.mean_confidence_interval(
    evaluate(start_params, test_tasks)["accuracy_after"])
  split = gradient_split(start_params, grad_tasks, first_order=learner.first_order)
  similarity = class_similarity(start_params, test_tasks)
  values = {k: float(v) for k, v in {**split, **similarity}.items()}
  return {"step": step, "accuracy": accuracy, "ci95": ci95, **values}


# %% [markdown]
# ## Training

# %%
records = {}
for name, learner in learners.items():
  meta_step = mj.make_meta_step(learner, optax.adam(META_LR))
  state = meta_step.init(params)
  records[name] = [measure(learner, state.params, 0)]
  progress = trange(NUM_STEPS, desc=name)
  for step in progress:
    tasks = sample_batch(jax.random.fold_in(train_key, step), train_images)
    state, metrics = meta_step.step(state, tasks)
    if (step + 1) % MEASURE_EVERY == 0:
      records[name].append(measure(learner, state.params, step + 1))
      progress.set_postfix(test_accuracy=f"{records[name][-1]['accuracy']:.3f}")
  last = records[name][-1]
  print(f"{name}: test accuracy {100 * last['accuracy']:.1f} +- {100 * last['ci95']:.1f} % "
        f"after {last['step']} steps; noise / gradient norm "
        f"{last['noise_norm'] / last['total_norm']:.3f}")


def series(name, key):
  return [r["step"] for r in records[name]], np.array([r[key] for r in records[name]])


COLORS = {"FOMAML": "tab:blue", "FOMAML + zeroing": "tab:orange", "MAML": "tab:blue",
          "MAML + zeroing": "tab:orange"}

# %% [markdown]
# ## Accuracy: with and without the zeroing trick
#
# Test accuracy after adaptation (mean and 95% confidence band over the held-out tasks).

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True, layout="constrained")
for ax, order in zip(axes, ("FOMAML", "MAML")):
  for name in (order, f"{order} + zeroing"):
    steps, accuracy = series(name, "accuracy")
    _, ci95 = series(name, "ci95")
    ax.plot(steps, 100 * accuracy, label=name, color=COLORS[name])
    ax.fill_between(steps, 100 * (accuracy - ci95), 100 * (accuracy + ci95), alpha=0.2,
                    color=COLORS[name])
  ax.set(title=f"{'first' if order == 'FOMAML' else 'second'} order",
         xlabel="meta-training step")
  ax.legend()
axes[0].set_ylabel(f"{WAYS}-way {SHOTS}-shot test accuracy (%)")
plt.show()

# %% [markdown]
# ## The noise term of the encoder gradient
#
# Left: the norm of the noise as a fraction of the norm of the whole encoder gradient. Right: the
# cosine between the whole gradient and its contrastive part (1 when there is no noise). With the
# zeroing trick the noise is gone at every step; without it, the random initial head makes it a
# large part of the gradient.

# %%
fig, (ax_noise, ax_cos) = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
for name in learners:
  style = "-" if name.startswith("MAML") else "--"
  steps, noise = series(name, "noise_norm")
  _, total = series(name, "total_norm")
  _, cosine = series(name, "cosine")
  ax_noise.plot(steps, noise / total, style, label=name, color=COLORS[name])
  ax_cos.plot(steps, cosine, style, label=name, color=COLORS[name])
ax_noise.set(xlabel="meta-training step", ylabel="|noise| / |encoder gradient|")
ax_cos.set(xlabel="meta-training step", ylabel="cos(gradient, contrastive part)")
ax_noise.legend()
plt.show()

# %% [markdown]
# ## Same-class and different-class features
#
# The contrastive loss pulls the features of same-class images together and pushes different
# classes apart: the mean cosine similarity of same-class pairs (solid) should rise above that of
# different-class pairs (dashed).

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True, layout="constrained")
for ax, order in zip(axes, ("FOMAML", "MAML")):
  for name in (order, f"{order} + zeroing"):
    steps, same = series(name, "same_class")
    _, different = series(name, "different_class")
    ax.plot(steps, same, "-", label=f"{name}: same class", color=COLORS[name])
    ax.plot(steps, different, "--", label=f"{name}: different class", color=COLORS[name])
  ax.set(title=f"{'first' if order == 'FOMAML' else 'second'} order",
         xlabel="meta-training step")
  ax.legend(fontsize=8)
axes[0].set_ylabel("mean feature cosine similarity")
plt.show()
