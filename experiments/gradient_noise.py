r"""Measures how noisy MAML's encoder gradient is while it meta-trains on Omniglot (Kao et al.).

For each variant (fo, so: first/second order; fo_zero, so_zero: with the zeroing trick), trains
ANIL MAML (one inner step) on the "kao" training characters and, every --measure_every steps on
fixed tasks, records the cosine between the MAML encoder gradient and its pure contrastive part,
the noise norm, the same/different-class feature similarity of held-out episodes and the test
accuracy (metajax.analysis.gradient_noise). Writes <workdir>/gradient_noise.json after every measurement
(atomically) and <workdir>/gradient_noise.png after every variant, then prints a summary.

  python experiments/gradient_noise.py --workdir=workdirs/gradient_noise_long \
    --data_dir=../shared/data/omniglot --num_steps=400 --measure_every=25 --seed=0

(the defaults: kao_conv, cross-entropy, 5-way 1-shot 15 queries, meta-batch 16, inner_lr 0.4,
meta_lr 1e-3, 32 measurement tasks, 100 test tasks). That run took 33 min on 2 shared CPU cores;
step 0 -> step 400 (one seed):

  variant  cos(total, contrastive)  noise norm           feature gap      test accuracy
  fo       0.614 -> 0.747           1.49 -> 0.233        0.053 -> 0.634   0.274 -> 0.828
  so       0.729 -> 0.927           2.16 -> 0.241        0.053 -> 0.621   0.274 -> 0.860
  fo_zero  1 -> 1                   2.5e-15 -> 2.3e-09   0.053 -> 0.642   0.308 -> 0.898
  so_zero  1 -> 1                   9.1e-10 -> 3.6e-09   0.053 -> 0.616   0.308 -> 0.870

The second-order cosine dipped to -0.35 at step 75; same-class feature similarity rose from
0.03 to ~0.51 and different-class fell from -0.02 to ~-0.12 for every variant.
"""

import io
import json
import time
from pathlib import Path

import jax
import optax
from absl import app, flags

import metajax as mj
from metajax import data
from metajax.analysis import gradient_noise as gn
from metajax.experiment.checkpoint import write_atomic
from metajax.platform import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the JSON and the PNG go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Omniglot archives (default: "
                                "$METAJAX_OMNIGLOT_DIR).")
flags.DEFINE_integer("num_steps", 500, "Outer steps per variant.", lower_bound=0)
flags.DEFINE_integer("measure_every", 25, "Outer steps between measurements.", lower_bound=1)
flags.DEFINE_integer("meta_batch_size", 16, "Tasks per outer step.", lower_bound=1)
flags.DEFINE_integer("ways", 5, "Classes per task.", lower_bound=2)
flags.DEFINE_integer("shots", 1, "Support examples per class.", lower_bound=1)
flags.DEFINE_integer("queries", 15, "Query examples per class.", lower_bound=1)
flags.DEFINE_float("inner_lr", 0.4, "Inner (head) step size.")
flags.DEFINE_float("meta_lr", 1e-3, "Adam step size of the outer loop.")
flags.DEFINE_enum("model", "kao_conv", ["kao_conv", "conv4"], "The encoder.")
flags.DEFINE_integer("filters", 64, "Channels of every conv layer.", lower_bound=1)
flags.DEFINE_enum("loss", "cross_entropy", ["mse_onehot", "cross_entropy"], "Inner/outer loss.")
flags.DEFINE_integer("seed", 0, "Seed of the init, the training tasks and the measurement tasks.")
flags.DEFINE_list("variants", list(gn.VARIANTS), f"Among {', '.join(gn.VARIANTS)}.")
flags.DEFINE_integer("num_measure_tasks", 32, "Tasks of the gradient and feature measurements.",
                     lower_bound=1)
flags.DEFINE_integer("num_eval_tasks", 100, "Held-out tasks of the accuracy.", lower_bound=1)
flags.DEFINE_bool("smoke", False, "Tiny sizes (overriding the flags in SMOKE), for tests.")
_HUGEPAGES = flags.DEFINE_enum("hugepages", None, ["auto", "on", "off"], "glibc's huge-page "
                                "malloc for XLA:CPU (the process re-executes itself once); default "
                                "$METAJAX_HUGEPAGES, else auto (on where it was measured to help).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS
CONFIG = ("num_steps", "measure_every", "meta_batch_size", "ways", "shots", "queries", "inner_lr",
          "meta_lr", "model", "filters", "loss", "seed", "variants", "num_measure_tasks",
          "num_eval_tasks")
SMOKE = {"num_steps": 2, "measure_every": 1, "meta_batch_size": 2, "queries": 2, "filters": 4,
         "num_measure_tasks": 2, "num_eval_tasks": 2}


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  return buffer.getvalue()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  runtime.prepare_process(_HUGEPAGES.value)  # before any work: glibc reads it at start-up
  c = {name: FLAGS[name].value for name in CONFIG} | (SMOKE if FLAGS.smoke else {})
  variants = gn.get_variants(c["variants"])
  split = data.omniglot_split(data.load_omniglot(_DATA_DIR.value), "kao")
  model = {"kao_conv": mj.kao_conv, "conv4": mj.conv4}[c["model"]](c["ways"], filters=c["filters"])
  init_key, train_key, measure_key = jax.random.split(jax.random.key(c["seed"]), 3)
  images = {s: jax.device_put(split[s].images) for s in ("train", "test")}
  samplers = {s: data.make_episode_sampler(split[s], c["ways"], c["shots"], c["queries"])
              for s in ("train", "test")}
  # Fixed measurement tasks: gradient (training classes), features and accuracy (held out).
  fixed = jax.jit(lambda key, images: [data.sample_meta_batch(
    samplers[s], jax.random.fold_in(key, i), images[s], num_tasks=c[n]) for i, (s, n) in enumerate(
      [("train", "num_measure_tasks"), ("test", "num_measure_tasks"),
       ("test", "num_eval_tasks")])])(measure_key, images)
  params = jax.jit(model.init)(init_key)

  def sample_train(key, train_images):
    return data.sample_meta_batch(samplers["train"], key, train_images,
                                  num_tasks=c["meta_batch_size"])

  workdir = Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  results = {"config": c, "seconds": {}, "series": {}}
  for name, variant in variants.items():
    records, start = [], time.time()
    for record in gn.measure_during_training(
        model, variant, params, sample_train, images["train"], train_key, *fixed,
        loss=c["loss"], inner_lr=c["inner_lr"], meta_optimizer=optax.adam(c["meta_lr"]),
        num_steps=c["num_steps"], measure_every=c["measure_every"]):
      records.append({**record, "seconds": time.time() - start})
      results["series"][name] = gn.to_series(records)
      results["seconds"][name] = records[-1]["seconds"]
      write_atomic(workdir / "gradient_noise.json",
                   json.dumps(results, indent=1, allow_nan=False).encode())
      print(f"{name} step {record['step']:5d} ({records[-1]['seconds']:6.0f} s): " + ", ".join(
        f"{k}={record[k]:.4g}" for k in gn.SUMMARY_KEYS), flush=True)
    fig = gn.plot_series(results["series"], title=f"ANIL MAML on Omniglot, {c['ways']}-way "
                         f"{c['shots']}-shot, {c['model']}, {c['loss']}, seed {c['seed']}")
    write_atomic(workdir / "gradient_noise.png", _png(fig))
  print(gn.format_summary(results["series"]))
  print(f"wrote {workdir / 'gradient_noise.json'} and {workdir / 'gradient_noise.png'}")


if __name__ == "__main__":
  app.run(main)
