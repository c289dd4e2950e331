"""Tests of the training loop (`metajax.experiment.train`), of config building and the
registries (`metajax.experiment.build`), and of the config files in `experiments/configs/`.

Mechanics are tested in-process on the sinusoid smoke config (a tiny MLP compiles in a second);
the binaries on real Omniglot are in test_experiments.py.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.algorithms.protonet import ProtoNet
from metajax.algorithms.reptile import Reptile
from metajax.experiment import build, checkpoint, metrics, train
from metajax.meta import MAML

REPO = Path(__file__).resolve().parents[2]


def load_config(name: str, variant: str):
  return build.load_config_file(f"{REPO / 'experiments/configs' / name}.py:{variant}")


def sinusoid_config(**overrides):
  config = load_config("sinusoid", "smoke")
  config.eval_every, config.test_num_tasks = 0, 0  # no evaluation: fewer compilations
  config.update(overrides)
  return config


def final_state(workdir: Path) -> dict:
  state_dict, _, _ = checkpoint.read_latest(workdir / train.CHECKPOINT_DIR)
  return state_dict


def assert_trees_bitwise_equal(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name, variants", [
  ("omniglot", ("5way1shot", "5way5shot", "20way1shot", "20way5shot", "kao5way1shot",
                "kao5way1shot_zeroing", "kao5way5shot", "kao5way5shot_zeroing", "reptile5way1shot",
                "reptile5way5shot", "protonet5way1shot", "protonet5way5shot", "protonet20way1shot",
                "protonet20way5shot", "umtra5way1shot", "smoke", "reptile_smoke",
                "protonet_smoke", "umtra_smoke", "pretrain5way1shot", "simclr5way1shot",
                "supcon5way1shot", "pretrain_smoke", "simclr_smoke", "supcon_smoke", "readme",
                "resnet12_5way1shot", "resnet12_5way5shot", "resnet12_smoke")),
  ("miniimagenet", ("5way1shot", "5way5shot", "resnet12_5way1shot", "resnet12_5way5shot")),
  ("sinusoid", ("default", "smoke")),
])
def test_every_config_is_valid(name, variants):
  for variant in variants:
    build.validate_config(load_config(name, variant))


def test_kao_config_matches_the_paper():
  c = load_config("omniglot", "kao5way1shot_zeroing")
  assert (c.model, c.split, c.rotations, c.meta_batch_size, c.meta_lr, c.inner_lr) == (
    "kao_conv", "kao", False, 32, 1e-3, 0.4)
  assert (c.num_inner_steps, c.eval_num_inner_steps, c.num_steps) == (2, 3, 3000)
  assert (c.algorithm, c.zeroing) == ("fomaml", True)


CONFIG_FILES = ("default", "omniglot", "miniimagenet", "sinusoid")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_give_every_field(name):
  """Every config is complete (the loop takes no partial config) and builds on default.py."""
  variants = [None] if name == "default" else list(_variants(name))
  for variant in variants:
    spec = f"{REPO / 'experiments/configs' / name}.py" + (f":{variant}" if variant else "")
    config = build.load_config_file(spec)
    assert set(config) == build.FIELDS, (name, variant)
    assert build.config_from_dict(config).to_dict() == config.to_dict()


def _variants(name):
  spec = importlib.util.spec_from_file_location(f"variants_{name}",
                                                REPO / "experiments/configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.VARIANTS


def test_an_unknown_variant_lists_the_valid_names():
  with pytest.raises(build.UnknownConfigError) as info:
    load_config("omniglot", "readne")
  message = str(info.value)
  assert "has no config 'readne' (did you mean 'readme'?)" in message
  assert all(name in message for name in _variants("omniglot"))


def test_archived_run_configs_are_accepted():
  """The reproduction archive's configs (written by earlier versions) still load and validate;
  fields they lack take the value those runs ran with."""
  paths = sorted((REPO / "docs/results/runs").glob("*/config.json"))
  assert paths
  for path in paths:
    config = build.config_from_dict(json.loads(path.read_text()))
    build.validate_config(config)
    assert set(config) == build.FIELDS
  assert build.config_from_dict({k: v for k, v in sinusoid_config().to_dict().items()
                                 if k != "steps_per_call"}).steps_per_call == 1


def test_a_config_missing_fields_is_an_error():
  values = sinusoid_config().to_dict()
  del values["meta_lr"]
  with pytest.raises(build.ConfigError, match="lacks the fields \\['meta_lr'\\].*default.py"):
    build.config_from_dict(values)


@pytest.mark.parametrize("overrides, message", [
  ({"algorithm": "reptyle"}, "algorithm='reptyle' is not one of"),
  ({"ways": 1}, "ways=1 must be an int >= 2"),
  ({"eval_num_inner_steps": 0}, "eval_num_inner_steps=0 must be an int >= 1"),
  ({"shots": 5, "queries": 16}, "shots + queries = 5 + 16 is more than the 20 images"),
  ({"ways": 500}, "ways=500 is more than the 423 classes"),
  ({"model": "resnet"}, "model='resnet' is not one of"),
  ({"dataset": "cifar"}, "dataset='cifar' is not one of"),
  ({"task_map": "vmapp"}, "task_map must be"),
  ({"split": "finn", "eval_split": "test", "rotations": True}, None),
  ({"split": "kao", "eval_split": "val"}, "eval_split='val' is not a split"),
  ({"inner_lr": -0.1}, "inner_lr=-0.1 must be a positive number"),
  ({"train_ways": 20}, "train_ways=20 differs from ways=5, which algorithm='fomaml' does not"),
  ({"algorithm": "protonet", "train_ways": 20}, None),
  ({"algorithm": "protonet", "train_ways": 3}, "train_ways=3 is less than ways=5"),
  ({"algorithm": "protonet", "train_ways": 2000}, "train_ways=2000 is more than the 1200 classes"),
  ({"train_ways": -1}, "train_ways=-1 must be an int >= 0"),
])
def test_validate_config(overrides, message):
  config = load_config("omniglot", "smoke")
  config.update(overrides)
  if message is None:
    build.validate_config(config)
    return
  with pytest.raises(build.ConfigError, match=message.replace("+", r"\+")):
    build.validate_config(config)


def test_validate_config_lists_every_problem():
  config = load_config("omniglot", "smoke")
  config.update(algorithm="nope", ways=1, eval_num_inner_steps=0)
  with pytest.raises(build.ConfigError) as info:
    build.validate_config(config)
  assert str(info.value).count("\n  - ") == 3


def test_bad_config_fails_before_anything_is_written(tmp_path):
  config = sinusoid_config(algorithm="nope")
  with pytest.raises(build.ConfigError, match="algorithm"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_missing_data_fails_before_anything_is_written(tmp_path):
  config = load_config("omniglot", "smoke")
  config.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere.*--config.data_dir"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_unknown_field_is_an_error(tmp_path):
  with pytest.raises(build.ConfigError, match="unknown config fields \\['num_step'\\]"):
    train.train_and_evaluate({**sinusoid_config().to_dict(), "num_step": 3}, tmp_path)


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_unwritable_workdir(tmp_path, kind):
  blocker = tmp_path / "file"
  blocker.write_text("")
  workdir = blocker if kind == "file" else blocker / "run"
  with pytest.raises((PermissionError, NotADirectoryError), match="workdir"):
    train.train_and_evaluate(sinusoid_config(), workdir)


@pytest.mark.parametrize("algorithm, zeroing", [
  ("maml", False), ("fomaml", True), ("anil", False), ("anil", True), ("metasgd", False)])
def test_build_learner(algorithm, zeroing):
  config = load_config("omniglot", "smoke")
  config.update(algorithm=algorithm, zeroing=zeroing)
  model = build.build_model(config)
  learner = build.build_learner(config, model, num_inner_steps=5)
  assert isinstance(learner, MAML)
  assert learner.num_inner_steps == 5
  assert learner.first_order == (algorithm == "fomaml")
  assert (learner.adapt_mask is not None) == (algorithm == "anil")
  assert (learner.learn_inner_lr == "element") == (algorithm == "metasgd")
  assert len(learner.params_transforms) == int(zeroing)


@pytest.mark.parametrize("algorithm", ["protonet", "umtra"])
def test_classification_only_algorithms_refuse_regression(algorithm):
  with pytest.raises(build.ConfigError, match=f"algorithm='{algorithm}' needs a classification"):
    build.validate_config(sinusoid_config(algorithm=algorithm))


def test_sinusoid_pretraining_fine_tunes_every_parameter(tmp_path):
  """Finn et al.'s baseline: one optimiser step on the MSE of the pooled support and query points
  of the sampled tasks, then plain fine-tuning of the whole network (no fresh head, nothing
  masked) at test time; and the binary's loop runs it."""
  config = sinusoid_config(algorithm="pretrain", num_steps=4, log_every=2)
  model = build.build_model(config)
  learner = build.build_learner(config, model, num_inner_steps=3)
  assert isinstance(learner, MAML)
  assert learner.first_order and learner.adapt_mask is None and not learner.params_transforms
  assert learner.num_inner_steps == 3
  meta_step = build.build_meta_step(config, model, learner)
  source = build.load_task_sources(config, ("train",))["train"]
  tasks = build.sample_tasks(source, jax.random.split(jax.random.key(1), config.meta_batch_size))
  params = model.init(jax.random.key(0))
  state = meta_step.init(params)
  new_state, step_metrics = meta_step.step(state, tasks)
  x = np.concatenate([np.reshape(tasks.support_x, (-1, 1)), np.reshape(tasks.query_x, (-1, 1))])
  y = np.concatenate([np.reshape(tasks.support_y, (-1, 1)), np.reshape(tasks.query_y, (-1, 1))])
  loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
  optimizer = build.build_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  chex.assert_trees_all_close(new_state.params, optax.apply_updates(params, updates), rtol=1e-5,
                              atol=1e-6)
  np.testing.assert_allclose(step_metrics["outer/loss"], loss, rtol=1e-5)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lambda line: None)
  assert result["step"] == 4 and np.isfinite(result["outer/loss"])


@pytest.mark.parametrize("algorithm, serial, learner_type, step_module", [
  ("reptile", False, Reptile, "metajax.algorithms.reptile"), ("reptile", True, Reptile, "metajax.algorithms.reptile"),
  ("protonet", False, ProtoNet, "metajax.meta"), ("umtra", False, MAML, "metajax.meta")])
def test_build_new_algorithms(algorithm, serial, learner_type, step_module):
  config = load_config("omniglot", "smoke")
  config.update(algorithm=algorithm, reptile_serial=serial, zeroing=True)
  if algorithm == "protonet":
    config.train_ways = 10
  model = build.build_model(config)
  learner = build.build_learner(config, model, num_inner_steps=5)
  assert type(learner) is learner_type
  assert len(learner.params_transforms) == 1  # zeroing composes with every learner
  if algorithm == "protonet":
    assert learner.num_classes == 10  # one learner for 10-way training and 5-way tests
  else:
    assert learner.num_inner_steps == 5
  meta_step = build.build_meta_step(config, model, learner, jit=False)
  assert meta_step.step.__module__ == step_module


@pytest.mark.parametrize("algorithm, pretrain_eval, learner_type, outputs", [
  ("pretrain", "", MAML, 1200), ("pretrain", "linear_probe", MAML, 1200),
  ("simclr", "", ProtoNet, 5), ("supcon", "finetune", MAML, 5)])
def test_build_pretraining_algorithms(algorithm, pretrain_eval, learner_type, outputs):
  config = load_config("omniglot", "smoke")
  config.update(algorithm=algorithm, pretrain_eval=pretrain_eval)
  model = build.build_model(config)
  params = model.init(jax.random.key(0))
  assert all(x.shape[-1] == outputs for x in jax.tree.leaves(params["head"]))
  learner = build.build_learner(config, model, num_inner_steps=3)
  assert type(learner) is learner_type
  if learner_type is MAML:  # a fresh zero 5-way head, whatever head was trained
    head = learner.model_params(learner.init(params))["head"]
    assert all(x.shape[-1] == 5 and not np.any(x) for x in jax.tree.leaves(head))
    assert (learner.adapt_mask is not None) == (pretrain_eval == "linear_probe")
  assert build.build_meta_step(config, model, learner, jit=False).step.__module__ == (
    "metajax.algorithms.pretrain")


def test_parse_task_map():
  assert build.parse_task_map("vmap") == "vmap"
  assert build.parse_task_map("8") == 8
  assert build.parse_task_map(4) == 4
  with pytest.raises(ValueError):
    build.parse_task_map("0")


# ------------------------------------------------------------------------------------ the loop


def test_loop_writes_metrics_checkpoints_and_results(tmp_path):
  lines = []
  config = sinusoid_config(eval_every=2, test_num_tasks=3, eval_num_tasks=3, eval_batch_size=2,
                           keep_checkpoints=2)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  assert result["step"] == 4
  assert np.isfinite(result["test/loss_after"]) and "test/loss_after_ci95" in result
  assert result["test/loss_after"] < result["test/loss_before"]
  assert json.loads((tmp_path / train.RESULTS_FILE).read_text())["step"] == 4
  # the 2 newest, and step 2, the one evaluation (the best by the validation loss)
  assert checkpoint.all_steps(tmp_path / train.CHECKPOINT_DIR) == [2, 3, 4]
  assert checkpoint.best_step(tmp_path / train.CHECKPOINT_DIR, train.best_of(config)) == 2
  records = metrics.read_metrics(tmp_path)
  names = set().union(*records)
  assert {"outer/loss", "outer/grad_norm", "inner/support_loss_before", "eval/loss_after",
          "test/loss_after"} <= names
  assert [r["step"] for r in records if "outer/loss" in r] == [1, 2, 3, 4]
  if importlib.util.find_spec("tensorboardX"):
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  progress = [line for line in lines if line.startswith("step ")]
  assert progress[-1].startswith("step 4/4 (100%)") and "steps/s" in progress[-1]
  assert "ETA" in progress[-1] and "outer/loss" in progress[-1]


def test_resume_is_bit_exact(tmp_path):
  uninterrupted = tmp_path / "uninterrupted"
  train.train_and_evaluate(sinusoid_config(num_steps=4), uninterrupted, print_fn=lambda _: None)
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(sinusoid_config(num_steps=2), resumed, print_fn=lambda _: None)
  lines = []
  train.train_and_evaluate(sinusoid_config(num_steps=4), resumed, print_fn=lines.append)
  assert any("resuming from checkpoint step 2" in line for line in lines)
  assert_trees_bitwise_equal(final_state(uninterrupted), final_state(resumed))
  # metrics of the resumed run continue the file without duplicates
  steps = [r["step"] for r in metrics.read_metrics(resumed) if "outer/loss" in r]
  assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("log_every, checkpoint_every, eval_every, limit, expected", [
  (100, 1_000, 1_000, 5, 5), (50, 250, 250, 5, 5), (25, 100, 0, 4, 1), (1, 1, 2, 5, 1),
  (6, 12, 0, 4, 3), (6, 12, 0, 1, 1),
])
def test_steps_per_call_divides_every_interval(log_every, checkpoint_every, eval_every, limit,
                                               expected):
  config = sinusoid_config(log_every=log_every, checkpoint_every=checkpoint_every,
                           eval_every=eval_every, steps_per_call=limit)
  assert train.steps_per_call(config) == expected


def test_several_steps_per_call_train_the_same_steps(tmp_path):
  # 3 steps per call (log every 3) against one step per call: the same tasks, the same updates.
  runs = {}
  for k in (1, 3):
    lines = []
    config = sinusoid_config(num_steps=6, log_every=3, checkpoint_every=6, steps_per_call=k)
    runs[k] = train.train_and_evaluate(config, tmp_path / f"k{k}", print_fn=lines.append)
    assert any(line.startswith("first 3 steps (one call)" if k == 3 else "first step")
               for line in lines)
    records = [r for r in metrics.read_metrics(tmp_path / f"k{k}") if "outer/loss" in r]
    assert [r["step"] for r in records] == [3, 6]
  chex.assert_trees_all_close(final_state(tmp_path / "k1"), final_state(tmp_path / "k3"),
                              rtol=1e-5, atol=1e-6)
  assert runs[1]["outer/loss"] == pytest.approx(runs[3]["outer/loss"], rel=1e-5)
  # A resumed multi-step run makes the same calls as an uninterrupted one: bit-exact.
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(sinusoid_config(num_steps=3, log_every=3, checkpoint_every=3,
                                           steps_per_call=3), resumed, print_fn=lambda _: None)
  train.train_and_evaluate(sinusoid_config(num_steps=6, log_every=3, checkpoint_every=3,
                                           steps_per_call=3), resumed, print_fn=lambda _: None)
  assert_trees_bitwise_equal(final_state(tmp_path / "k3"), final_state(resumed))


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
  uninterrupted = tmp_path / "uninterrupted"
  train.train_and_evaluate(sinusoid_config(num_steps=4), uninterrupted, print_fn=lambda _: None)
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(sinusoid_config(num_steps=3), resumed, print_fn=lambda _: None)
  stored = checkpoint.checkpoint_path(resumed / train.CHECKPOINT_DIR, 3) / "config" / "metadata"
  stored.write_text(stored.read_text().replace('"seed": 0', '"seed": 1'))  # a flipped digit
  lines = []
  with pytest.warns(UserWarning, match="checkpoint_00000003.* is corrupt") as caught:
    train.train_and_evaluate(sinusoid_config(num_steps=4), resumed, print_fn=lines.append)
  assert len([w for w in caught if "broken checkpoint" in str(w.message)]) == 1
  assert any("resuming from checkpoint step 2" in line for line in lines)
  assert_trees_bitwise_equal(final_state(uninterrupted), final_state(resumed))
  assert checkpoint.all_steps(resumed / train.CHECKPOINT_DIR) == [2, 3, 4]  # step 3 rewritten
  checkpoint.read(resumed / train.CHECKPOINT_DIR, 3)  # and good again


def test_a_workdir_of_the_earlier_checkpoint_format_is_refused(tmp_path):
  (tmp_path / train.CHECKPOINT_DIR).mkdir()
  (tmp_path / train.CHECKPOINT_DIR / "checkpoint_00000250.msgpack").write_bytes(b"\x85")
  with pytest.raises(checkpoint.CheckpointError, match="earlier msgpack format"):
    train.train_and_evaluate(sinusoid_config(), tmp_path, print_fn=lambda _: None)
  with pytest.raises(checkpoint.CheckpointError, match="earlier msgpack format"):
    train.restore_learner(tmp_path)


def test_the_run_records_its_versions(tmp_path):
  train.train_and_evaluate(sinusoid_config(num_steps=1), tmp_path, print_fn=lambda _: None)
  train.train_and_evaluate(sinusoid_config(num_steps=2), tmp_path, print_fn=lambda _: None)
  entries = json.loads((tmp_path / train.VERSIONS_FILE).read_text())
  assert [e["step"] for e in entries] == [0, 1]  # one entry per invocation, from its start step
  assert entries[0]["jax"] == jax.__version__ and entries[0]["numpy"] == np.__version__
  assert {"python", "jaxlib", "flax", "optax", "orbax-checkpoint", "metajax", "git_revision",
          "git_dirty"} <= set(entries[0])
  if (REPO / ".git").exists():  # a checkout: the revision is a commit hash
    assert len(entries[0]["git_revision"]) == 40


def test_restore_learner_picks_the_best_checkpoint(tmp_path):
  config = sinusoid_config(num_steps=4, eval_every=1, eval_num_tasks=2, eval_batch_size=2,
                           keep_checkpoints=1)
  train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)
  losses = {r["step"]: r["eval/loss_after"] for r in metrics.read_metrics(tmp_path)
            if "eval/loss_after" in r}
  best = min(losses, key=losses.get)
  assert losses.keys() == {1, 2, 3}  # the last step's eval split is "test": no validation there
  assert checkpoint.all_steps(tmp_path / train.CHECKPOINT_DIR) == sorted({best, 4})
  assert train.restore_learner(tmp_path, best=True)[-1] == best
  assert train.restore_learner(tmp_path)[-1] == 4


def test_a_dataset_is_one_registry_entry(tmp_path, monkeypatch):
  """Nothing in the loop, the checks or the data loading names a dataset: a new entry trains."""
  spec = build.DATASETS["sinusoid"]
  monkeypatch.setitem(build.DATASETS, "wave", spec._replace(
    checks=(lambda config, spec: [] if config.shots <= 10 else ["wave: shots > 10"],)))
  build.validate_config(sinusoid_config(dataset="wave"))
  with pytest.raises(build.ConfigError, match="wave: shots > 10"):
    build.validate_config(sinusoid_config(dataset="wave", shots=11))
  result = train.train_and_evaluate(sinusoid_config(dataset="wave", num_steps=2), tmp_path,
                                    print_fn=lambda _: None)
  assert result["step"] == 2 and np.isfinite(result["outer/loss"])


def test_resume_with_another_config_is_an_error(tmp_path):
  train.train_and_evaluate(sinusoid_config(num_steps=1), tmp_path, print_fn=lambda _: None)
  with pytest.raises(build.ConfigError, match="hidden: \\[8, 8\\] in the checkpoint, \\[4, 4\\]"):
    train.train_and_evaluate(sinusoid_config(num_steps=2, hidden=(4, 4)), tmp_path)


def test_checkpoint_of_another_model_shape_is_an_error(tmp_path):
  # a checkpoint whose arrays do not fit its config's model (e.g. written by other code)
  config = sinusoid_config(num_steps=2)
  other = train.train_and_evaluate(sinusoid_config(num_steps=1, hidden=(4, 4)), tmp_path / "o",
                                   print_fn=lambda _: None)
  del other
  state_dict, _, _ = checkpoint.read_latest(tmp_path / "o" / train.CHECKPOINT_DIR)
  checkpoint.save(tmp_path / "run" / train.CHECKPOINT_DIR, 1, state_dict,
                  config=build.config_to_dict(config))
  with pytest.raises(checkpoint.CheckpointError, match="shape \\(4,\\) float32 in the checkpoint, "
                     "\\(8,\\) float32 in this model"):
    train.train_and_evaluate(config, tmp_path / "run", print_fn=lambda _: None)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  # SGD with a huge meta-lr: step 1's loss is finite but its update blows the weights up to ~1e30,
  # so the meta-loss of step 2 is not finite.
  config = sinusoid_config(num_steps=4, optimizer="sgd", meta_lr=1e30, log_every=4)
  with pytest.raises(train.NonFiniteError, match="at step 2: training stopped; the last good "
                     "checkpoint is step 1"):
    train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)
  ckpt_dir = tmp_path / train.CHECKPOINT_DIR
  assert checkpoint.all_steps(ckpt_dir) == [1]
  state_dict, _, step = checkpoint.read_latest(ckpt_dir)
  assert step == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state_dict))
  assert not (tmp_path / train.RESULTS_FILE).exists()


def test_evaluator_tasks_do_not_depend_on_batch_size():
  config = sinusoid_config()
  model = build.build_model(config)
  learner = build.build_learner(config, model)
  params = model.init(jax.random.key(0))
  source = build.load_task_sources(config, ("test",))["test"]
  key = jax.random.key(7)
  a = train.make_evaluator(learner, source, num_tasks=5, batch_size=2, key=key)(params)
  b = train.make_evaluator(learner, source, num_tasks=5, batch_size=5, key=key)(params)
  assert a["loss_after"].shape == (5,)
  np.testing.assert_allclose(a["loss_after"], b["loss_after"], rtol=1e-5)


# ------------------------------------------------------------------------- algorithms on Omniglot


def omniglot_smoke(variant, omniglot_dir, omniglot_cache_dir, **overrides):
  config = load_config("omniglot", variant)
  config.update(data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir), eval_every=0,
                **overrides)
  return config


@pytest.mark.parametrize("variant, overrides", [
  ("protonet_smoke", {}), pytest.param("umtra_smoke", {}, marks=pytest.mark.slow),
  ("pretrain_smoke", {}),
  pytest.param("supcon_smoke", {"pretrain_eval": "linear_probe"}, marks=pytest.mark.slow)])
def test_algorithm_smoke_config(variant, overrides, omniglot_dir, omniglot_cache_dir,
                                omniglot_pool, tmp_path):
  """One step of the algorithm's smoke config on real Omniglot, then the test evaluation.
  (simclr_smoke differs from supcon_smoke only in its objective, tested in
  test_contrastive_pretrain.py; its wiring in test_build_pretraining_algorithms.)"""
  del omniglot_pool  # only requested so that the cache is warm
  config = omniglot_smoke(variant, omniglot_dir, omniglot_cache_dir, num_steps=1, **overrides)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)
  assert result["step"] == 1 and np.isfinite(result["outer/loss"])
  assert 0.0 <= result["test/accuracy_after"] <= 1.0
  assert checkpoint.all_steps(tmp_path / train.CHECKPOINT_DIR) == [1]


def test_reptile_smoke_config_resumes(omniglot_dir, omniglot_cache_dir, omniglot_pool, tmp_path):
  """Serial Reptile's own meta-step: one step, then a resumed second one and the test
  evaluation (its checkpoint is the shared MetaState)."""
  del omniglot_pool
  config = omniglot_smoke("reptile_smoke", omniglot_dir, omniglot_cache_dir, num_steps=1,
                          test_num_tasks=0)
  assert train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)["step"] == 1
  lines = []
  config.update(num_steps=2, test_num_tasks=4)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  assert any("resuming from checkpoint step 1" in line for line in lines)
  assert result["step"] == 2 and np.isfinite(result["outer/grad_norm"])
  assert 0.0 <= result["test/accuracy_after"] <= 1.0


@pytest.mark.parametrize("workdir", sorted(
  p.parents[1] for p in (REPO / "docs/results/runs").glob("*/checkpoints/checkpoint_*")),
  ids=lambda p: p.name)
def test_an_archived_checkpoint_restores_into_its_model(workdir):
  """The reproduction archive's checkpoints of unfinished runs (written by earlier versions)
  load as evaluate.py and classify.py load them, without a fall-back."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", checkpoint.CheckpointWarning)
    config, _, _, params, step = train.restore_learner(workdir)
  assert step == checkpoint.latest_step(workdir / train.CHECKPOINT_DIR)
  assert config.dataset == json.loads((workdir / "config.json").read_text())["dataset"]
  assert jax.tree.leaves(params) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
