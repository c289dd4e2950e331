"""The head as a parameter: `HeadSpec` on metajax's, Flax's and NNX's params layouts."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from absl.testing import parameterized
from flax import nnx

import metajax as mj
from metajax import variants

F64_TOL = 1e-12


def _linen_tree():
  return {"params": {"Conv_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                     "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(2, 2, rngs=rngs)
    self.head = nnx.Linear(2, 3, rngs=rngs)


class HeadSpecTest(parameterized.TestCase):

  def test_default_finds_the_head_in_every_layout(self):
    ours = mj.mlp(3, hidden=(2,), input_shape=(2,)).init(jax.random.key(0))
    nnx_params = nnx.split(_Net(nnx.Rngs(0)), nnx.Param)[1]
    for params in (ours, _linen_tree(), nnx_params):
      paths = variants.leaf_paths(params)
      flags = variants.head_flags(params)
      self.assertEqual(flags, ["head" in p for p in paths])
      self.assertEqual(sorted(variants.head_subtree(params)), ["bias", "kernel"])

  def test_path_and_predicate_pick_the_same_leaves(self):
    tree = {"params": {"body": {"kernel": jnp.ones(2)}, "classifier": {"kernel": jnp.ones(3)}}}
    by_str = variants.head_flags(tree, "params/classifier")
    by_tuple = variants.head_flags(tree, ("params", "classifier"))
    by_predicate = variants.head_flags(tree, lambda path: "classifier" in path)
    self.assertEqual(by_str, [False, True])
    self.assertEqual(by_tuple, by_str)
    self.assertEqual(by_predicate, by_str)
    chex.assert_trees_all_equal(variants.head_subtree(tree, lambda p: "classifier" in p),
                                {"kernel": jnp.ones(3)})

  def test_zero_head_and_masks_on_the_flax_tree(self):
    tree = _linen_tree()
    zeroed = mj.zero_head(tree)
    chex.assert_trees_all_equal(zeroed["params"]["Conv_0"], tree["params"]["Conv_0"])
    self.assertEqual(float(sum(jnp.sum(w) for w in jax.tree.leaves(zeroed["params"]["head"]))), 0)
    mask = mj.head_mask(tree)
    self.assertEqual(mask["params"]["head"], {"kernel": True, "bias": True})
    self.assertEqual(mj.encoder_mask(tree)["params"]["Conv_0"], {"kernel": True, "bias": True})
    other = {"params": {"body": {"kernel": jnp.ones(2)}, "out": {"kernel": jnp.ones(3)}}}
    self.assertEqual(mj.head_mask_for("params/out")(other),
                     {"params": {"body": {"kernel": False}, "out": {"kernel": True}}})
    self.assertEqual(float(jnp.sum(mj.zero_head_for("params/out")(other)["params"]["out"]
                                   ["kernel"])), 0)

  def test_with_zeroing_and_anil_for_a_named_head_equal_the_default(self):
    """A head named "out" (given by path) behaves exactly as the same head named "head"."""
    with jax.enable_x64(True):
      model = mj.mlp(3, hidden=(4,), input_shape=(2,), dtype=jnp.float64)
      params = model.init(jax.random.key(0))
      params = {**params, "head": jax.tree.map(lambda w: w + 0.5, params["head"])}
      renamed = {"encoder": params["encoder"], "out": params["head"]}
      apply_renamed = lambda p, x: model.apply({"encoder": p["encoder"], "head": p["out"]}, x)  # noqa: E731
      key = jax.random.key(1)
      tasks = mj.Task(jax.random.normal(key, (2, 6, 2), jnp.float64),
                      jnp.tile(jnp.arange(3).repeat(2), (2, 1)),
                      jax.random.normal(jax.random.fold_in(key, 1), (2, 6, 2), jnp.float64),
                      jnp.tile(jnp.arange(3).repeat(2), (2, 1)))
      want_learner = mj.with_zeroing(mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.3,
                                             adapt_mask=mj.head_mask))
      got_learner = mj.with_zeroing(mj.MAML(apply_renamed, mj.cross_entropy, inner_lr=0.3,
                                            adapt_mask=mj.head_mask_for("out")), head="out")
      want = jax.grad(mj.meta_loss)(params, tasks, want_learner)
      got = jax.grad(mj.meta_loss)(renamed, tasks, got_learner)
      chex.assert_trees_all_close(got["encoder"], want["encoder"], rtol=F64_TOL, atol=F64_TOL)
      chex.assert_trees_all_close(got["out"], want["head"], rtol=F64_TOL, atol=F64_TOL)

  def test_bad_specs(self):
    tree = _linen_tree()
    with self.assertRaisesRegex(ValueError, r"no leaf of params matches the path 'params/out'"):
      mj.head_mask(tree, "params/out")
    with self.assertRaisesRegex(ValueError, "empty path"):
      mj.head_mask(tree, "")
    with self.assertRaisesRegex(ValueError, "every leaf of params matches"):
      mj.head_mask(tree, "params")
    with self.assertRaisesRegex(ValueError, "do not form one subtree"):
      variants.head_subtree(tree, lambda p: p[-1] == "bias")
