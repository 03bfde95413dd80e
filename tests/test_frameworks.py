"""The recipes of the README for Flax NNX, Flax linen and Equinox, and grain's data iterators.

Each recipe trains a few steps, saves through a `CheckpointManager`, builds its target the way
the framework builds abstract state, restores, and trains on: the resumed run must equal the
uninterrupted one bit for bit. A second test restores onto another mesh."""

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import asyncckpt as ac

STEPS, CUT = 6, 3


def auto_mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def batch(step):
    k1, k2 = jax.random.split(jax.random.key(step))
    return jax.random.normal(k1, (16, 8)), jax.random.normal(k2, (16, 4))


def assert_trees_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert_leaves_same(a, b)


def assert_leaves_same(a, b):
    """Same array leaves (a TrainState's optimizer closures differ between two `create`s)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if callable(x):  # code (an Equinox activation) is the same object
            assert x is y
            continue
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert_same(x, y)


# ------------------------------------------------------------------------------- Flax NNX


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        self.l1 = nnx.Linear(8, 32, kernel_init=init, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)  # its typed key changes every step
        self.l2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def nnx_create():
    model = NnxModel(nnx.Rngs(0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    # keep every variable on its annotated sharding: otherwise sharding propagation moves some
    # (the biases) after the first step, and a resumed run, which starts from the annotations,
    # compiles another program whose results differ in the last bit
    state = nnx.state((model, optimizer))
    nnx.update(
        (model, optimizer), jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
    )
    return loss


def nnx_train(model, optimizer, steps):
    return [float(nnx_step(model, optimizer, *batch(s))) for s in steps]


def test_nnx_resume_is_bit_for_bit(tmp_path):
    mesh = auto_mesh((4, 2))
    with jax.set_mesh(mesh):
        model, optimizer = nnx_create()
        reference = nnx_train(model, optimizer, range(1, STEPS + 1))
        expected = nnx.state((model, optimizer))

        model, optimizer = nnx_create()
        losses = nnx_train(model, optimizer, range(1, CUT + 1))
        with ac.CheckpointManager(tmp_path) as mgr:
            mgr.save(CUT, nnx.state((model, optimizer)))
        del model, optimizer

        # the recipe: an abstract model under the mesh, split, restore, merge
        with ac.CheckpointManager(tmp_path) as mgr:
            graphdef, abstract = nnx.split(nnx.eval_shape(nnx_create))
            model, optimizer = nnx.merge(graphdef, mgr.restore(target=abstract))
        losses += nnx_train(model, optimizer, range(CUT + 1, STEPS + 1))
    assert losses == reference
    assert_trees_same(nnx.state((model, optimizer)), expected)
    kernel = model.l1.kernel[...]
    assert kernel.sharding == NamedSharding(mesh, P(None, "model"))


def test_nnx_restores_onto_another_mesh(tmp_path):
    with jax.set_mesh(auto_mesh((4, 2))):
        model, optimizer = nnx_create()
        nnx_train(model, optimizer, range(1, CUT + 1))
        saved = nnx.state((model, optimizer))
        ac.save(tmp_path / "ck", saved)
    other = auto_mesh((2, 4))
    with jax.set_mesh(other):
        graphdef, abstract = nnx.split(nnx.eval_shape(nnx_create))
        restored = ac.restore(tmp_path / "ck", target=abstract)
    assert_trees_same(restored, saved)
    for leaf, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert leaf.sharding.mesh == other  # the concrete mesh in context
        assert leaf.sharding.spec == spec.sharding.spec
    model, optimizer = nnx.merge(graphdef, restored)
    assert model.l1.kernel[...].sharding == NamedSharding(other, P(None, "model"))


def test_abstract_mesh_target_needs_a_mesh_in_context(tmp_path):
    with jax.set_mesh(auto_mesh((4, 2))):
        ac.save(tmp_path / "ck", nnx.state(nnx_create()[0]))
        abstract = nnx.state(nnx.eval_shape(lambda: nnx_create()[0]))
    with pytest.raises(
        ac.TreeMismatchError, match=r"abstract mesh .* inside `with jax\.set_mesh\(mesh\):`"
    ):
        ac.restore(tmp_path / "ck", target=abstract)
    with (
        jax.set_mesh(auto_mesh((8, 1))),
        pytest.raises(ac.TreeMismatchError, match=r"\{'data': 4, 'model': 2\}.*\{'data': 8"),
    ):
        ac.restore(tmp_path / "ck", target=abstract)


# ----------------------------------------------------------------------- Flax linen TrainState


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        x = nn.relu(nn.Dense(32, kernel_init=init)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(4)(x)


TX = optax.adam(1e-2)  # one optimizer: a TrainState holds it as static structure


LINEN_MODEL = LinenModel()  # one module: its `apply` is static structure too


def linen_create():
    params = LINEN_MODEL.init(jax.random.key(0), jnp.ones((1, 8)), train=False)["params"]
    return train_state.TrainState.create(apply_fn=LINEN_MODEL.apply, params=params, tx=TX)


def linen_shardings(mesh):
    """The usual linen way: logical partitioning metadata in the abstract state, unboxed."""
    return nn.unbox(nn.get_sharding(jax.eval_shape(linen_create), mesh))


def linen_target(mesh):
    """Abstract TrainState with each leaf's sharding on `mesh`: the recipe's target."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(jax.eval_shape(linen_create)),
        linen_shardings(mesh),
    )


def linen_step(mesh):
    """The jitted train step; its output state stays on the annotated shardings (see nnx_step)."""

    def step(state, x, y, key):
        def loss_fn(params):
            out = state.apply_fn({"params": params}, x, train=True, rngs={"dropout": key})
            return jnp.mean((out - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return jax.jit(step, out_shardings=(linen_shardings(mesh), None))


def linen_train(step_fn, state, steps):
    losses = []
    for s in steps:
        state, loss = step_fn(state, *batch(s), jax.random.fold_in(jax.random.key(7), s))
        losses.append(float(loss))
    return state, losses


def test_linen_train_state_resume_is_bit_for_bit(tmp_path):
    mesh = auto_mesh((4, 2))
    create = jax.jit(lambda: nn.unbox(linen_create()), out_shardings=linen_shardings(mesh))
    step = linen_step(mesh)
    reference, ref_losses = linen_train(step, create(), range(1, STEPS + 1))
    state, losses = linen_train(step, create(), range(1, CUT + 1))
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(CUT, state)
    del state
    with ac.CheckpointManager(tmp_path) as mgr:
        state = mgr.restore(target=linen_target(mesh))
    assert isinstance(state, train_state.TrainState) and state.apply_fn is not None
    state, more = linen_train(step, state, range(CUT + 1, STEPS + 1))
    assert losses + more == ref_losses
    assert_leaves_same(state, reference)


def test_linen_train_state_restores_onto_another_mesh(tmp_path):
    mesh = auto_mesh((4, 2))
    state = jax.jit(lambda: nn.unbox(linen_create()), out_shardings=linen_shardings(mesh))()
    state, _ = linen_train(linen_step(mesh), state, range(1, CUT + 1))
    ac.save(tmp_path / "ck", state)
    other = auto_mesh((1, 8))
    restored = ac.restore(tmp_path / "ck", target=linen_target(other))
    assert_leaves_same(restored, state)
    kernel = restored.params["Dense_0"]["kernel"]
    assert kernel.sharding == NamedSharding(other, P(None, "model"))
    assert len(kernel.addressable_shards) == 8


# ---------------------------------------------------------------------------------- Equinox


def eqx_create():
    return eqx.nn.MLP(8, 4, 32, 2, activation=jax.nn.gelu, key=jax.random.key(0))


def eqx_sharding(leaf, mesh):
    """(32, n) matrices (weights and their Adam moments) split by rows over `model`, the rest
    replicated; None for code and static leaves."""
    if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return None
    return NamedSharding(mesh, P("model", None) if leaf.ndim == 2 and leaf.shape[0] == 32 else P())


def eqx_shard(tree, mesh):
    return eqx.filter_shard(tree, jax.tree.map(lambda x: eqx_sharding(x, mesh), tree))


@eqx.filter_jit
def eqx_step(model, opt_state, x, y, mesh):
    loss, grads = eqx.filter_value_and_grad(lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2))(model)
    updates, opt_state = TX.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    # pinned to the same shardings as the target (see nnx_step)
    model, opt_state = eqx_shard((eqx.apply_updates(model, updates), opt_state), mesh)
    return model, opt_state, loss


def eqx_train(model, opt_state, steps, mesh):
    losses = []
    for s in steps:
        model, opt_state, loss = eqx_step(model, opt_state, *batch(s), mesh)
        losses.append(float(loss))
    return model, opt_state, losses


def eqx_target(mesh):
    """The recipe's target: `filter_eval_shape` of the creation function, with shardings. The
    activation functions stay in it: asyncckpt saves their names only, and takes them from the
    target."""

    def create():
        model = eqx_create()
        return model, TX.init(eqx.filter(model, eqx.is_array))

    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=eqx_sharding(x, mesh))
            if isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        eqx.filter_eval_shape(create),
    )


def test_equinox_resume_is_bit_for_bit(tmp_path):
    mesh = auto_mesh((4, 2))
    model = eqx_create()
    place = eqx.filter_jit(eqx_shard)
    model, opt_state = place((model, TX.init(eqx.filter(model, eqx.is_array))), mesh)
    reference, _, ref_losses = eqx_train(model, opt_state, range(1, STEPS + 1), mesh)
    model, opt_state, losses = eqx_train(model, opt_state, range(1, CUT + 1), mesh)
    with ac.CheckpointManager(tmp_path) as mgr:
        mgr.save(CUT, (model, opt_state))  # the whole module: its functions are code, not saved
    del model, opt_state
    with ac.CheckpointManager(tmp_path) as mgr:
        model, opt_state = mgr.restore(target=eqx_target(mesh))
    assert model.activation is jax.nn.gelu
    model, opt_state, more = eqx_train(model, opt_state, range(CUT + 1, STEPS + 1), mesh)
    assert losses + more == ref_losses
    assert_trees_same(eqx.filter(model, eqx.is_array), eqx.filter(reference, eqx.is_array))
    assert model.layers[1].weight.sharding == NamedSharding(mesh, P("model", None))


def test_equinox_restores_onto_another_mesh_and_without_target(tmp_path):
    model = eqx.filter_jit(eqx_shard)(eqx_create(), auto_mesh((4, 2)))
    ac.save(tmp_path / "ck", model)
    other = auto_mesh((1, 8))
    restored = ac.restore(tmp_path / "ck", target=eqx_target(other)[0])
    assert_trees_same(restored, model)
    assert restored.layers[1].weight.sharding == NamedSharding(other, P("model", None))
    plain = ac.restore(tmp_path / "ck")  # no target: the fields as a dict, functions as None
    assert plain["activation"] is None
    assert_same(plain["layers"][0]["weight"], model.layers[0].weight)


def test_callable_leaves_are_named_not_saved(tmp_path):
    tree = {"w": np.arange(3.0), "f": np.sin, "g": lambda x: x}
    ac.save(tmp_path / "ck", tree)
    assert list(ac.list_variables(tmp_path / "ck")) == ["w"]
    back = ac.restore(tmp_path / "ck", target={"w": np.zeros(3), "f": np.cos, "g": abs})
    assert back["f"] is np.cos and back["g"] is abs  # code comes from the target
    assert_same(back["w"], tree["w"])
    with pytest.raises(ac.TreeMismatchError, match=r"in the target but not .*\['h'\]"):
        ac.restore(tmp_path / "ck", target={"w": np.zeros(3), "h": np.zeros(1)})


# ------------------------------------------------------------------------------------ grain


def loader(seed=0):
    return grain.DataLoader(
        data_source=list(range(200)),
        sampler=grain.samplers.IndexSampler(200, shuffle=True, seed=seed, num_epochs=1),
        operations=[grain.transforms.Batch(8)],
        worker_count=0,
    )


@pytest.mark.parametrize("kind", ["DataLoader", "IterDataset"])
def test_data_iterator_state_commits_with_the_step(tmp_path, kind):
    def fresh():
        if kind == "DataLoader":
            return iter(loader())
        return iter(grain.MapDataset.source(list(range(200))).shuffle(seed=3).batch(8))

    data = fresh()
    with ac.CheckpointManager(tmp_path) as mgr:
        for step in range(1, 5):
            next(data)
            mgr.save(step, {"x": np.full(2, step), "data": data})
    expected = [next(data) for _ in range(3)]
    with ac.CheckpointManager(tmp_path) as mgr:
        again = fresh()
        restored = mgr.restore(target={"x": np.zeros(2, np.int64), "data": again})
        assert restored["data"] is again
        assert_same(restored["x"], np.full(2, 4))
        assert all((a == b).all() for a, b in zip(expected, [next(again) for _ in range(3)]))
        # each step holds the position at its own save, not the latest one
        early = fresh()
        mgr.restore(2, target={"x": np.zeros(2, np.int64), "data": early})
        reference = fresh()
        for _ in range(2):
            next(reference)
        assert (next(early) == next(reference)).all()


def test_data_iterator_target_mismatches_name_the_leaf(tmp_path):
    ac.save(tmp_path / "ck", {"data": iter(loader()), "n": 1})
    with pytest.raises(ac.TreeMismatchError, match=r"'data'.*get_state/set_state"):
        ac.restore(tmp_path / "ck", target={"data": 0, "n": 1})
    with pytest.raises(ac.TreeMismatchError, match=r"'n'.*get_state/set_state"):
        ac.restore(tmp_path / "ck", target={"data": iter(loader()), "n": iter(loader())})
    assert ac.restore(tmp_path / "ck")["data"].startswith(b"{")  # the raw state, no target


def test_data_iterator_state_that_is_not_json_is_refused(tmp_path):
    class Odd:
        def get_state(self):
            return {"when": object()}

        def set_state(self, state):
            pass

    with pytest.raises(ac.UnsupportedTypeError, match=r"\['it'\].*not JSON or bytes"):
        ac.save(tmp_path / "ck", {"it": Odd()})
