"""Loss landscapes: directions, the grid engine against a loop and a quadratic with known Hessian, BatchNorm
interpolation, resumable scans, PCA directions, and the measured chunk size."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from pipeline.config import ModelConfig
from pipeline.landscape import engine as evaluate_module
from pipeline.landscape.directions import (
    difference_direction,
    direction_id,
    direction_norm,
    eigenvector_directions,
    pca_directions,
    random_direction,
)
from pipeline.landscape.engine import (
    choose_chunk,
    choose_layout,
    evaluate_points,
    evaluation_view,
    linear_chain,
    sequential_shift_loop,
)
from pipeline.landscape.measures import barrier
from pipeline.landscape.plan import symmetric_axis
from pipeline.landscape.tiles import TileStore, grid_coords, make_tiles, scan, scan_fingerprint
from pipeline.training.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny forwards here gain nothing from two, and on a busy machine a second thread
    spin-waiting for a descheduled partner costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_and_state(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model(name, ModelConfig(), (1, 8, 8), 10).to(dtype).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return model, params, buffers


def probe(n=36, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def set_bn_statistics(model, seed):
    """A few train-mode forwards on shifted random data, so the running statistics differ from the defaults."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8, generator=g, dtype=next(model.parameters()).dtype) * 2 + 0.5)
    model.eval()


# --------------------------------------------------------------------------------------------------------------
# Directions
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_filter_normalisation_matches_weight_filters(name):
    _, params, _ = model_and_state(name)
    d = random_direction(params, seed=5)
    assert list(d) == list(params)
    checked = 0
    for n, w in params.items():
        assert d[n].shape == w.shape and d[n].dtype == w.dtype
        if w.dim() > 1:
            torch.testing.assert_close(d[n].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
            checked += w.shape[0]
        else:
            assert not d[n].any()  # biasbn: biases and BatchNorm parameters do not move
    assert checked == (128 + 128 + 10 if name == "mlp" else 16 + 2 * 3 * (16 + 32 + 64) + 10)


def test_layer_none_and_ignore_modes():
    _, params, _ = model_and_state("mlp")
    raw = random_direction(params, seed=7, norm="none", ignore="none")
    g = torch.Generator().manual_seed(7)
    for n, w in params.items():  # the raw Gaussian stream, drawn in the parameters' order
        assert torch.equal(raw[n], torch.randn(w.shape, generator=g))
    layer = random_direction(params, seed=7, norm="layer")
    for n, w in params.items():
        if w.dim() > 1:
            assert math.isclose(float(layer[n].norm()), float(w.norm()), rel_tol=1e-5)
            assert torch.allclose(layer[n] / layer[n].norm(), raw[n] / raw[n].norm(), rtol=1e-5, atol=1e-7)
    raw_biasbn = random_direction(params, seed=7, norm="none")
    assert torch.equal(raw_biasbn["net.1.weight"], raw["net.1.weight"]) and not raw_biasbn["net.1.bias"].any()
    keep = random_direction(params, seed=7, ignore="none")
    bias = params["net.1.bias"]
    assert math.isclose(float(keep["net.1.bias"].norm()), float(bias.norm()), rel_tol=1e-5)
    assert not torch.allclose(keep["net.1.bias"], bias)  # not loss-landscape's copy of the weights
    assert torch.equal(keep["net.1.weight"], random_direction(params, seed=7)["net.1.weight"])


def test_seeds_and_bad_names():
    _, params, _ = model_and_state("mlp")
    a, b, c = (random_direction(params, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["net.1.weight"], c["net.1.weight"])
    assert direction_id(a) == direction_id(b) != direction_id(c)
    with pytest.raises(ValueError, match="norm: unknown value 'unit'; allowed: filter, layer, none"):
        random_direction(params, seed=0, norm="unit")
    with pytest.raises(ValueError, match="ignore: unknown value 'bn'"):
        random_direction(params, seed=0, ignore="bn")


def test_direction_id_is_content_addressed():
    d = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(2, dtype=torch.float64)}
    same = {"b": d["b"].clone(), "a": d["a"].clone()}  # another order, same content
    assert direction_id(d) == direction_id(same) and len(direction_id(d)) == 16
    nudged = dict(d, a=d["a"].clone())
    nudged["a"][1, 2] = torch.nextafter(nudged["a"][1, 2], torch.tensor(math.inf))  # one ulp
    assert direction_id(nudged) != direction_id(d)
    assert direction_id({"a": d["a"].double(), "b": d["b"]}) != direction_id(d)  # dtype counts
    assert math.isclose(direction_norm(d), float(d["a"].double().norm()), rel_tol=1e-12)


def test_pca_recovers_the_trajectory_plane():
    g = torch.Generator().manual_seed(11)
    final = {
        "w1": torch.randn(6, 5, generator=g, dtype=torch.float64),
        "b1": torch.randn(6, generator=g, dtype=torch.float64),
        "w2": torch.randn(3, 6, generator=g, dtype=torch.float64),
    }
    sizes = [final[n].numel() if final[n].dim() > 1 else 0 for n in final]
    basis, _ = torch.linalg.qr(torch.randn(sum(sizes), 2, generator=g, dtype=torch.float64))

    def embed(v):  # a flat vector over the dim > 1 entries -> a direction with zero bias
        out, start = {}, 0
        for n, t in final.items():
            k = t.numel() if t.dim() > 1 else 0
            out[n] = v[start : start + k].view(t.shape) if k else torch.zeros_like(t)
            start += k
        return out

    u, v = embed(basis[:, 0]), embed(basis[:, 1])
    trajectory = [dict(final)]  # the final point itself is skipped
    for i in range(16):
        t = 2 * math.pi * i / 16  # sum cos*sin = 0: u and v are the principal axes, variances 9:1
        trajectory.append(
            {
                n: final[n]
                + 3 * math.cos(t) * u[n]
                + math.sin(t) * v[n]
                + 1e-4 * torch.randn(final[n].shape, generator=g, dtype=torch.float64)
                for n in final
            }
        )
    dirs, ratios = pca_directions(trajectory, final, k=2)
    assert len(dirs) == 2 and sum(ratios) > 0.99 and ratios[0] > ratios[1]
    assert math.isclose(ratios[0], 0.9, rel_tol=1e-3)
    for d, truth in zip(dirs, (u, v)):
        assert not d["b1"].any()  # biasbn zeroes dim <= 1 before the SVD
        assert math.isclose(direction_norm(d), 1.0, rel_tol=1e-12)
        cos = sum(float((d[n] * truth[n]).sum()) for n in final)
        assert abs(cos) > 0.999
        flat = torch.cat([t.reshape(-1) for t in d.values()])
        assert flat[flat.abs().argmax()] > 0  # sign convention
    with pytest.raises(ValueError, match="non-zero differences from final, need at least k = 2"):
        pca_directions([final, trajectory[1]], final, k=2)


def test_eigenvector_and_difference_directions():
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(14, 3, generator=g, dtype=torch.float64))
    vectors = {"w": q[:10].T.reshape(3, 2, 5).float(), "b": q[10:].T.reshape(3, 4).float()}
    dirs = eigenvector_directions({"eigenvalues": torch.tensor([3.0, 2.0, 1.0]), "vectors": vectors}, k=2)
    assert len(dirs) == 2
    for i, d in enumerate(dirs):
        assert math.isclose(direction_norm(d), 1.0, rel_tol=1e-6)
        torch.testing.assert_close(d["w"], vectors["w"][i])
    with pytest.raises(ValueError, match="k: must be between 1 and the 3 stored eigenvectors, got 4"):
        eigenvector_directions({"vectors": vectors}, k=4)
    a, b = {"w": torch.ones(2)}, {"w": torch.tensor([3.0, -1.0])}
    assert torch.equal(difference_direction(a, b)["w"], torch.tensor([2.0, -2.0]))


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [True, False])  # nn.Sequential -> linear-chain engine; bare Linear -> vmap
def test_quadratic_model_scans_exactly(wrap):
    """MSE of a linear model is quadratic: L(w + a v1 + b v2) = L0 + a g.v1 + b g.v2 + (l1 a^2 + l2 b^2) / 2."""
    g = torch.Generator().manual_seed(0)
    n, dim = 23, 6
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    t = torch.randn(n, 1, generator=g, dtype=torch.float64)
    linear = nn.Linear(dim, 1, bias=False).double()
    model = nn.Sequential(linear) if wrap else linear
    params = {k: p.detach() for k, p in model.named_parameters()}
    w = params[next(iter(params))].reshape(-1)
    residual = x @ w - t[:, 0]
    loss0 = float((residual**2).mean())
    grad = 2 * x.T @ residual / n
    lam, vecs = torch.linalg.eigh(2 * x.T @ x / n)
    lam, vecs = lam.flip(0), vecs.flip(1)
    key = next(iter(params))
    dirs = [{key: vecs[:, i].view(1, dim)} for i in range(2)]
    alphas = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for chunk in (1, 4):  # batches of 5: 5+5+5+5+3 samples, weighted exactly
        loss, acc = evaluate_points(
            model, params, {}, dirs[:1], alphas[:, None], x, t, batch_size=5, chunk=chunk, loss="mse"
        )
        expected = loss0 + alphas * float(grad @ vecs[:, 0]) + 0.5 * float(lam[0]) * alphas**2
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
        assert torch.isnan(acc).all()
    coords = grid_coords([alphas, torch.linspace(-1, 1, 5, dtype=torch.float64)])
    loss, _ = scan(model, params, {}, dirs, coords, x, t, None, tile_size=7, chunk=3, batch_size=5, loss="mse")
    a, b = coords[:, 0], coords[:, 1]
    expected = (
        loss0
        + a * float(grad @ vecs[:, 0])
        + b * float(grad @ vecs[:, 1])
        + 0.5 * (float(lam[0]) * a**2 + float(lam[1]) * b**2)
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_batched_engine_matches_loop_and_baseline(name):
    model, params, buffers = model_and_state(name)
    if name == "resnet20":
        set_bn_statistics(model, seed=1)
    x, y = probe(22)  # batches of 16 and 6
    dirs = [random_direction(params, seed=s) for s in (1, 2)]
    axis = torch.linspace(-0.3, 0.3, 3, dtype=torch.float64)
    coords = grid_coords([axis, axis])
    before = state_copy(model)
    model.train()  # evaluation is in eval mode whatever the module's flags, which stay as they are
    ref_loss, ref_acc = evaluate_points(
        model, params, buffers, dirs, coords, x, y, chunk=1, batch_size=16, channels_last=False
    )
    assert model.training
    model.eval()
    assert (name == "mlp") == (linear_chain(evaluation_view(model)) is not None)
    variants = [(4, "auto", None), (7, "auto", None), (4, "vmap", None)]
    if name == "resnet20":
        variants += [(1, "auto", True), (4, "auto", True), (3, "auto", False)]
    for chunk, engine, channels_last in variants:
        loss, acc = evaluate_points(
            model,
            params,
            buffers,
            dirs,
            coords,
            x,
            y,
            chunk=chunk,
            batch_size=16,
            engine=engine,
            channels_last=channels_last,
        )
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert torch.equal(acc, ref_acc)
    assert_same_state(model, before)
    with torch.no_grad():  # the centre of the grid is the model itself
        assert math.isclose(float(ref_loss[4]), float(F.cross_entropy(model(x), y)), rel_tol=1e-6)
    base_loss, base_acc = sequential_shift_loop(model, dirs, coords, x, y, batch_size=16)
    assert_same_state(model, before)
    torch.testing.assert_close(base_loss, ref_loss, rtol=1e-5, atol=0)
    assert torch.equal(base_acc, ref_acc)


def _fit_to_small_loss(name, x, y, target=1e-3):
    """``name`` trained (Adam, full batch, eval mode: BatchNorm on fixed statistics) until its loss on ``(x, y)`` is
    below ``target``; returns the model and that loss, float64 cross-entropy of its float32 outputs."""
    model, _, _ = model_and_state(name, seed=4)
    if name == "resnet20":
        set_bn_statistics(model, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2000):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if loss.item() < target / 3:
            break
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        trained = float(F.cross_entropy(model(x).double(), y))
    assert trained < target
    return model, trained


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_the_grid_centre_is_the_trained_loss_at_small_loss(name):
    """At loss 1e-3 and below, the engine's loss at c = 0 equals the trained model's to 1e-6 relative, one point
    per forward or many (float32 ``logsumexp - picked`` was 6.7e-5 off there)."""
    x, y = probe(40, seed=5)
    model, trained = _fit_to_small_loss(name, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    dirs = [random_direction(params, seed=s) for s in (1, 2)]
    axis = symmetric_axis(5, 0.5)
    coords = grid_coords([axis, axis])
    centre = int(torch.nonzero((coords == 0).all(dim=1))[0])
    # the trained model's layout: channels-last convolutions round differently (measured 1.4e-6 relative at 2.4e-4)
    for chunk in (1, 4, 25):
        loss, _ = evaluate_points(
            model, params, buffers, dirs, coords, x, y, chunk=chunk, batch_size=16, channels_last=False
        )
        assert math.isclose(float(loss[centre]), trained, rel_tol=1e-6), (chunk, float(loss[centre]), trained)


def test_points_are_bitwise_identical_for_every_chunk_size():
    _, params, _ = model_and_state("resnet20")
    points = evaluate_module._Points(params, [random_direction(params, seed=s, ignore="none") for s in (1, 2, 3)])
    coords = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stacked = points.at(coords)
    assert stacked.keys() == params.keys()
    for i in range(5):
        single = points.at(coords[i : i + 1])
        assert all(torch.equal(stacked[n][i], single[n][0]) for n in params)


def test_vmap_works_with_plain_eval_batchnorm():
    """vmap over functional_call of a model with eval-mode nn.BatchNorm2d works, and the engine agrees with it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    set_bn_statistics(model, seed=2)
    x, y = probe(10)
    y = y % 3
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    stacked = {n: torch.stack([p, 1.1 * p]) for n, p in params.items()}
    out = vmap(lambda p: functional_call(model, {**p, **buffers}, (x,)))(stacked)
    mine, _ = evaluate_points(
        model, params, buffers, [params], torch.tensor([[0.0], [0.1]], dtype=torch.float64), x, y, chunk=2
    )
    expected = torch.stack([F.cross_entropy(o, y) for o in out]).double()
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=0)


def test_batchnorm_buffers_interpolate_between_models():
    model_a, pa, ba = model_and_state("resnet20", seed=0, dtype=torch.float64)
    model_b, pb, bb = model_and_state("resnet20", seed=1, dtype=torch.float64)
    set_bn_statistics(model_a, seed=5)
    set_bn_statistics(model_b, seed=6)
    assert not torch.equal(ba["bn1.running_mean"], bb["bn1.running_mean"])
    x, y = probe(24, dtype=torch.float64)
    d = difference_direction(pa, pb)
    db = {n: bb[n] - ba[n] for n in ba if ba[n].is_floating_point()}
    coords = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    loss, acc = evaluate_points(model_a, pa, ba, [d], coords, x, y, chunk=2, batch_size=10, buffer_directions=[db])
    with torch.no_grad():
        for i, model in enumerate((model_a, model_b)):
            out = model(x)
            assert math.isclose(float(loss[i]), float(F.cross_entropy(out, y)), rel_tol=1e-6)
            assert float(acc[i]) == float((out.argmax(1) == y).double().mean())
        plain, _ = evaluate_points(model_a, pa, ba, [d], coords, x, y, chunk=1)
        assert abs(float(plain[1]) - float(F.cross_entropy(model_b(x), y))) > 1e-3  # B's weights, A's statistics
    loop, _ = evaluate_points(model_a, pa, ba, [d], coords, x, y, chunk=1, buffer_directions=[db])
    torch.testing.assert_close(loop, loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="only floating-point buffers can move"):
        evaluate_points(
            model_a,
            pa,
            ba,
            [d],
            coords,
            x,
            y,
            chunk=1,
            buffer_directions=[{"bn1.num_batches_tracked": torch.tensor(1)}],
        )


def test_bad_arguments_raise_value_errors():
    model, params, buffers = model_and_state("mlp")
    x, y = probe(4)
    d = [random_direction(params, seed=0)]
    c = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"coords: expected shape \(P, 1\)"):
        evaluate_points(model, params, buffers, d, torch.zeros(2, 2), x, y, chunk=1)
    with pytest.raises(ValueError, match="chunk: must be >= 1"):
        evaluate_points(model, params, buffers, d, c, x, y, chunk=0)
    with pytest.raises(ValueError, match="loss: unknown name 'hinge'"):
        evaluate_points(model, params, buffers, d, c, x, y, chunk=1, loss="hinge")
    with pytest.raises(ValueError, match=r"directions\[0\]: unknown name 'nope'"):
        evaluate_points(model, params, buffers, [{"nope": torch.zeros(1)}], c, x, y, chunk=1)
    with pytest.raises(ValueError, match="engine: unknown name"):
        evaluate_points(model, params, buffers, d, c, x, y, chunk=1, engine="jit")


# --------------------------------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------------------------------


def test_grid_and_tiles():
    coords = grid_coords([torch.tensor([0.0, 1.0]), torch.tensor([5.0, 6.0, 7.0])])
    assert coords.dtype == torch.float64
    assert coords.tolist() == [[0, 5], [0, 6], [0, 7], [1, 5], [1, 6], [1, 7]]  # first axis slowest
    tiles = make_tiles(10, 4)
    assert [(t.index, t.start, t.stop) for t in tiles] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    with pytest.raises(ValueError, match="tile_size: must be >= 1"):
        make_tiles(3, 0)


class Interrupt(Exception):
    pass


def test_scan_resumes_from_stored_tiles(tmp_path):
    model, params, buffers = model_and_state("mlp")
    x, y = probe(20)
    dirs = [random_direction(params, seed=s) for s in (1, 2)]
    coords = grid_coords([torch.linspace(-1, 1, 5, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)])
    kwargs = dict(tile_size=4, chunk=3, batch_size=8)  # 20 points: 5 tiles
    fingerprint = scan_fingerprint(directions=[direction_id(d) for d in dirs], coords=coords, tile_size=4)
    seen = []

    def stop_after_two(tile, done, total):
        seen.append((tile.index, done, total))
        if done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        scan(
            model,
            params,
            buffers,
            dirs,
            coords,
            x,
            y,
            TileStore(tmp_path, fingerprint),
            on_tile=stop_after_two,
            **kwargs,
        )
    assert seen == [(0, 1, 5), (1, 2, 5)]
    store = TileStore(tmp_path, fingerprint)
    assert store.done() == {0, 1}
    with pytest.raises(ValueError, match="12 of 20 rows missing"):
        store.load_all(20)
    seen.clear()
    loss, acc = scan(model, params, buffers, dirs, coords, x, y, store, on_tile=lambda *a: seen.append(a), **kwargs)
    assert [(t.index, done, total) for t, done, total in seen] == [(2, 3, 5), (3, 4, 5), (4, 5, 5)]
    full_loss, full_acc = scan(model, params, buffers, dirs, coords, x, y, None, **kwargs)
    assert torch.equal(loss, full_loss) and torch.equal(acc, full_acc)
    other = TileStore(tmp_path, scan_fingerprint(directions=["x"], coords=coords, tile_size=4))
    assert other.done() == set()  # another scan's tiles are cleared
    assert "fingerprint" in (tmp_path / "fingerprint.json").read_text()


def test_barrier_of_known_paths():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert math.isclose(barrier((1 + torch.sin(math.pi * t)).tolist()), 1.0, rel_tol=1e-12)
    assert math.isclose(barrier([0.2, 0.9, 0.5]), 0.9 - 0.35, rel_tol=1e-12)
    assert barrier([0.3, 0.2, 0.1]) >= 0 and barrier([1.0, 3.0]) == 1.0
    with pytest.raises(ValueError, match="losses: need at least the two endpoints"):
        barrier([1.0])


# --------------------------------------------------------------------------------------------------------------
# Chunk size
# --------------------------------------------------------------------------------------------------------------


def test_choose_chunk_measures_once_and_caches(monkeypatch):
    model, params, buffers = model_and_state("mlp")
    x, _ = probe(32)
    calls = []
    real = evaluate_module._time_chunk

    def counting(*args):
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(evaluate_module, "_time_chunk", counting)
    monkeypatch.setattr(evaluate_module, "CHUNK_CACHE", {})  # a fresh cache, restored after the test
    chunk = choose_chunk(model, params, buffers, x, candidates=(1, 2, 4), batch_size=32)
    assert chunk in (1, 2, 4) and calls
    assert list(evaluate_module.CHUNK_CACHE.values()) == [chunk]
    key = (evaluate_module.structure_key(model, params, buffers), "cpu", "torch.float32", (1, 8, 8), 32)
    assert next(iter(evaluate_module.CHUNK_CACHE))[:5] == key
    n_calls = len(calls)
    assert choose_chunk(model, params, buffers, x, candidates=(1, 2, 4), batch_size=32) == chunk
    assert len(calls) == n_calls  # cached: no timing the second time


def test_measured_chunk_and_layout_are_keyed_by_the_architecture(monkeypatch):
    """``resnet20`` and ``resnet20_noshort`` share their class and parameter count but not their forward: each gets its
    own measurement; a dtype gets its own too, and one architecture built twice shares one."""
    measured = []

    def fake(model, params, buffers, x, y, chunk, batch_size, engine, channels_last=None):
        measured.append(model)
        return 1e-3

    monkeypatch.setattr(evaluate_module, "_time_chunk", fake)
    monkeypatch.setattr(evaluate_module, "CHUNK_CACHE", {})
    monkeypatch.setattr(evaluate_module, "LAYOUT_CACHE", {})
    x, _ = probe(8)
    keys = {}
    for name, seed in (("resnet20", 0), ("resnet20_noshort", 0), ("resnet20", 1)):
        model, params, buffers = model_and_state(name, seed=seed)
        keys[name, seed] = evaluate_module.structure_key(model, params, buffers)
        choose_chunk(model, params, buffers, x, candidates=(1, 2), batch_size=8)
        choose_layout(model, params, buffers, x, batch_size=8)
    assert keys["resnet20", 0] == keys["resnet20", 1] != keys["resnet20_noshort", 0]
    assert len(evaluate_module.CHUNK_CACHE) == 2 and len(evaluate_module.LAYOUT_CACHE) == 2
    assert len({id(m) for m in measured}) == 2  # the second resnet20 reused the first one's measurements
    double, params, buffers = model_and_state("resnet20", dtype=torch.float64)
    assert evaluate_module.structure_key(double, params, buffers) != keys["resnet20", 0]


def test_choose_chunk_rule_stops_after_two_drops_in_a_row(monkeypatch):
    model, params, buffers = model_and_state("mlp")
    x, _ = probe(8)
    seconds = {1: 1e-3, 2: 1e-3, 4: 1e-3, 8: 4e-3, 16: 8e-3, 32: 1e-3}  # rates 1k, 2k, 4k, 2k, 2k: stop at 16
    timed = []

    def fake(model, params, buffers, x, y, chunk, batch_size, engine):
        timed.append(chunk)
        return seconds[chunk]

    monkeypatch.setattr(evaluate_module, "_time_chunk", fake)
    monkeypatch.setattr(evaluate_module, "CHUNK_CACHE", {})
    assert choose_chunk(model, params, buffers, x, candidates=(32, 16, 8, 4, 2, 1), batch_size=8) == 4
    assert 32 not in timed
    # one dip (chunk 8) is not enough to stop: the faster chunk 16 after it is found
    seconds.update({16: 1e-3})
    monkeypatch.setattr(evaluate_module, "CHUNK_CACHE", {})
    assert choose_chunk(model, params, buffers, x, candidates=(32, 16, 8, 4, 2, 1), batch_size=8) == 32
    with pytest.raises(ValueError, match="candidates: need positive integers"):
        choose_chunk(model, params, buffers, x, candidates=(0, 2))


def test_choose_layout_measures_conv_models_only(monkeypatch):
    monkeypatch.setattr(evaluate_module, "LAYOUT_CACHE", {})
    mlp, params, buffers = model_and_state("mlp")
    x, _ = probe(8)
    assert choose_layout(mlp, params, buffers, x) is False and evaluate_module.LAYOUT_CACHE == {}
    resnet, params, buffers = model_and_state("resnet20")
    decision = choose_layout(resnet, params, buffers, x)
    key = evaluate_module.structure_key(resnet, params, buffers)
    assert evaluate_module.LAYOUT_CACHE == {(key, "cpu", "torch.float32", (1, 8, 8), 8): decision}
    with pytest.raises(ValueError, match="channels_last: needs 4-D inputs"):
        evaluate_points(
            mlp,
            dict(mlp.named_parameters()),
            {},
            [],
            torch.zeros(1, 0),
            x.flatten(1),
            torch.zeros(8, dtype=torch.long),
            chunk=1,
            channels_last=True,
        )
