"""compress_adapters / SharedBasisBundle on tiny PEFT LoRAs: exactness, errors, save/load, export,
projection, clustering and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterlab.adapters import LoraModule, LoraSource, resolve_adapter
from adapterlab.compression import SharedBasisBundle, compress_adapters
from adapterlab.models import tiny_llama
from tests.merging._helpers import make_lora_dirs
from tests.tolerances import assert_close

N, R = 3, 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("compress-adapters"), N, r=R)


@pytest.fixture(scope="module")
def exact(dirs: list[Path]) -> SharedBasisBundle:
    return compress_adapters(dirs, rank=N * R)


def _source(name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str | None = None) -> LoraSource:
    """An in-memory LoraSource with the given weight-layout factors (scale 1)."""
    tensors, modules = {}, {}
    for mod, (b, a) in factors.items():
        tensors[f"{mod}.B"], tensors[f"{mod}.A"] = b, a
        modules[mod] = LoraModule(mod, f"{mod}.A", f"{mod}.B", a.shape[0], 1.0, False, False, (b.shape[0], a.shape[1]))
    return LoraSource(name, {"peft_type": "LORA", "base_model_name_or_path": base}, modules, tensors.__getitem__)


def _subspace_sources(prefix: str, seed: int, n: int = 3, k: int = 4) -> list[LoraSource]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"m.q": (24, 20), "m.v": (16, 20)}
    bases = {
        m: (torch.linalg.qr(torch.randn(o, k, generator=g))[0], torch.linalg.qr(torch.randn(i, k, generator=g))[0])
        for m, (o, i) in shapes.items()
    }
    out = []
    for j in range(n):
        f = {
            m: (U0 @ torch.randn(k, 2, generator=g), torch.randn(2, k, generator=g) @ V0.T)
            for m, (U0, V0) in bases.items()
        }
        out.append(_source(f"{prefix}{j}", f))
    return out


# ---------------------------------------------------------------------------------------------
# exactness and the factors contract


def test_c_equal_n_r_reconstructs_every_adapter_exactly(dirs: list[Path], exact: SharedBasisBundle) -> None:
    from peft import PeftModel

    sources = [resolve_adapter(d) for d in dirs]
    assert exact.names == [s.name for s in sources]
    for s in sources:
        for mod in exact.module_names:
            assert_close(exact.delta(s.name, mod), s.delta(mod))
    assert exact.errors.mean < 1e-10
    # the folded scale is peft's own (alpha/r and rsLoRA alpha/sqrt(r)): compare with peft's delta
    pm = PeftModel.from_pretrained(tiny_llama(), str(dirs[1]))
    mod = "model.layers.1.self_attn.q_proj"
    assert_close(exact.delta(sources[1].name, mod), pm.base_model.model.get_submodule(mod).get_delta_weight("default"))


def test_factors_contract(exact: SharedBasisBundle) -> None:
    assert exact.module_names == sorted(resolve_adapter(Path(exact.sources[0]["path"])).modules)
    for mod in exact.module_names:
        U, V, cores, group = exact.factors(mod)
        d_out, d_in = exact.shapes[mod]
        assert U.shape == (1, d_out, N * R) and V.shape == (1, N * R, d_in) and cores.shape == (N, N * R, N * R)
        assert U.dtype == V.dtype == cores.dtype == torch.float32 and group.dtype == torch.long
        i = exact.index("task2")
        B, A = exact.reconstruct("task2", mod)
        assert_close(B @ A, U[group[i]] @ cores[i] @ V[group[i]])
    with pytest.raises(KeyError, match="nope"):
        exact.index("nope")


def test_diagonal_block_init_is_exact_and_its_objective_never_increases(dirs: list[Path]) -> None:
    b = compress_adapters(dirs, rank=N * R, mode="diagonal", init="block", niter=5)
    assert b.errors.mean < 1e-8
    assert b.factors(b.module_names[0])[2].shape == (N, N * R)
    d = compress_adapters(dirs, rank=3, mode="diagonal", niter=30)
    for hist in d.history.values():
        h = hist[0]
        assert all(y <= x + 1e-4 * h[0] for x, y in zip(h, h[1:]))


def test_error_non_increasing_in_c(dirs: list[Path]) -> None:
    prev = float("inf")
    for c in (1, 2, 4, 8, 12):
        err = compress_adapters(dirs, rank=c).errors.mean
        assert err <= prev + 1e-9
        prev = err
    assert prev < 1e-10


@pytest.mark.parametrize("how", ["none", "normalize"])
def test_other_normalizations_are_exact_too(dirs: list[Path], how: str) -> None:
    assert compress_adapters(dirs, rank=N * R, normalization=how).errors.mean < 1e-10


def test_normalize_ba_stores_the_delta_norms(dirs: list[Path], exact: SharedBasisBundle) -> None:
    s = resolve_adapter(dirs[0])
    mod = exact.module_names[0]
    assert_close(exact.norms[mod][0], s.delta(mod).norm())


def test_storage_counts(exact: SharedBasisBundle) -> None:
    st = exact.storage()
    c = N * R
    assert st["bases_params"] == sum(c * (o + i) for o, i in exact.shapes.values())
    assert st["cores_params"] == N * len(exact.module_names) * c * c
    assert st["raw_params"] == N * sum(R * (o + i) for o, i in exact.shapes.values())


# ---------------------------------------------------------------------------------------------
# save / load / export


def test_save_load_round_trip(exact: SharedBasisBundle, tmp_path: Path) -> None:
    out = exact.save(tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == [
        "bases.safetensors",
        "compressed_config.json",
        "sigmas.safetensors",
    ]
    cfg = json.loads((out / "compressed_config.json").read_text())
    assert cfg["type"] == "shared_basis" and cfg["rank_c"] == N * R and cfg["n_loras"] == N
    back = SharedBasisBundle.load(out)
    assert back.names == exact.names and back.mode == exact.mode and back.module_names == exact.module_names
    for mod in exact.module_names:
        for x, y in zip(back.factors(mod), exact.factors(mod)):
            assert torch.equal(x, y)
    assert torch.equal(back.errors.values, exact.errors.values)
    with pytest.raises(FileExistsError):
        exact.save(out)


def test_load_refuses_pickle_and_broken_bundles(exact: SharedBasisBundle, tmp_path: Path) -> None:
    out = exact.save(tmp_path / "b")
    torch.save({"x": torch.zeros(1)}, out / "bases.safetensors")  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="not (a valid )?safetensors"):
        SharedBasisBundle.load(out)
    with pytest.raises(FileNotFoundError, match="compressed_config.json"):
        SharedBasisBundle.load(tmp_path)


def test_export_is_a_peft_lora_equal_to_the_reconstruction(dirs: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel

    b = compress_adapters(dirs, rank=5)
    out = b.export("task1", tmp_path / "exp")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5
    pm = PeftModel.from_pretrained(tiny_llama(), str(out))
    for mod in b.module_names:
        got = pm.base_model.model.get_submodule(mod).get_delta_weight("default")
        assert_close(got, b.delta("task1", mod))
    # the model with the exported adapter = the base with the reconstruction added
    ref = tiny_llama()
    b.apply_(ref, "task1")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------
# projection and clustering


def test_project_adds_without_refitting(dirs: list[Path], tmp_path: Path) -> None:
    b = compress_adapters(dirs[:2], rank=5)
    bases = {m: tuple(t.clone() for t in b.bases[m]) for m in b.module_names}
    b.project(dirs[0], "copy")
    assert b.names[-1] == "copy"
    for m in b.module_names:
        assert all(torch.equal(x, y) for x, y in zip(b.bases[m], bases[m]))
        assert_close(b.cores[m][2], b.cores[m][0])
    new = resolve_adapter(make_lora_dirs(tmp_path, 1, r=R, seed=50)[0])
    b.project(new, "new")
    for m in b.module_names:  # brute force: the optimal core for orthonormal bases is Uᵀ ΔW Vᵀ
        U, V, cores, _ = b.factors(m)
        assert_close(cores[-1], U[0].T @ new.delta(m) @ V[0].T)
        err = (new.delta(m) - b.delta("new", m)).pow(2).sum() / new.delta(m).pow(2).sum()
        assert abs(b.errors.adapter("new")[m] - float(err)) < 1e-4
    assert b.errors.values.shape == (4, len(b.module_names)) and len(b.raw_params) == 4
    with pytest.raises(ValueError, match="already in the bundle"):
        b.project(dirs[1], "copy")


def test_project_diagonal_matches_a_fitted_adapter(dirs: list[Path]) -> None:
    b = compress_adapters(dirs, rank=4, mode="diagonal", niter=20)
    b.project(dirs[2], "again")
    m = b.module_names[0]
    assert_close(b.cores[m][-1], b.cores[m][2], dtype=torch.bfloat16)  # the fit's last σ-step = the projection


def test_clusters_recover_unrelated_groups() -> None:
    srcs = _subspace_sources("a", 1) + _subspace_sources("b", 2)
    one = compress_adapters(srcs, rank=4, normalization="none")
    two = compress_adapters(srcs, rank=4, clusters=2, normalization="none")
    assert one.errors.mean > 0.05
    assert two.errors.mean < 1e-8
    groups = two.clusters
    assert sorted(sorted(v) for v in groups.values()) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    U, V, _, group = two.factors("m.q")
    assert U.shape == (2, 24, 4) and V.shape == (2, 4, 20) and group.shape == (6,)
    # a new member of group b joins its cluster exactly
    two.project(_subspace_sources("b", 2, n=4)[3], "b3")
    assert two.clusters[int(two.group[-1])] == sorted(n for n in two.names if n.startswith("b"))
    assert two.errors.per_adapter()["b3"] < 1e-8


def test_dict_input_and_peft_model_input(dirs: list[Path]) -> None:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_llama(), str(dirs[2]))
    b = compress_adapters({"x": dirs[0], "y": dirs[1], "z": pm}, rank=N * R)
    assert b.names == ["x", "y", "z"] and b.errors.mean < 1e-10


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_settings(dirs: list[Path]) -> None:
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        compress_adapters(dirs, rank=0)
    with pytest.raises(ValueError, match="exceeds min"):
        compress_adapters(dirs, rank=40)
    with pytest.raises(ValueError, match="mode='bogus'.*full, diagonal"):
        compress_adapters(dirs, rank=2, mode="bogus")
    with pytest.raises(ValueError, match="normalization"):
        compress_adapters(dirs, rank=2, normalization="l2")
    with pytest.raises(ValueError, match="clusters=4"):
        compress_adapters(dirs, rank=2, clusters=4)
    with pytest.raises(ValueError, match="init='block' is for mode='diagonal'"):
        compress_adapters(dirs, rank=12, init="block")


def test_mixed_ranks_need_the_flag(dirs: list[Path], tmp_path: Path) -> None:
    small = make_lora_dirs(tmp_path, 1, r=2, seed=7)[0]
    with pytest.raises(ValueError, match="rank 2 .*allow_mixed_ranks"):
        compress_adapters([*dirs[:2], small], rank=4)
    b = compress_adapters([*dirs[:2], small], rank=10, allow_mixed_ranks=True)
    assert b.errors.mean < 1e-10
    src = resolve_adapter(small)
    assert b.names == ["task0", "task1", "task0_2"]  # duplicate folder names are made unique
    for mod in b.module_names:
        assert_close(b.delta("task0_2", mod), src.delta(mod))


def test_other_bases_and_nan_are_refused(dirs: list[Path], tmp_path: Path) -> None:
    wide = make_lora_dirs(tmp_path / "wide", 1, r=R, hidden_size=128)[0]
    with pytest.raises(ValueError, match="different bases"):
        compress_adapters([dirs[0], wide], rank=2)
    g = torch.Generator().manual_seed(0)
    a = _source("a", {"m": (torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g))}, base="org/one")
    b = _source("b", {"m": (torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g))}, base="org/two")
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        compress_adapters([a, b], rank=2)
    assert compress_adapters([a, b], rank=4, check_base=False).errors.mean < 1e-10
    bad_b = torch.randn(8, 2, generator=g)
    bad_b[3, 1] = float("nan")
    c = _source("c", {"m": (bad_b, torch.randn(2, 6, generator=g))}, base="org/one")
    with pytest.raises(ValueError, match="'c'.*'m'.*NaN or Inf"):
        compress_adapters([a, c], rank=2)
    inf = _source("d", {"m": (torch.randn(8, 2, generator=g), torch.full((2, 6), float("inf")))}, base="org/one")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress_adapters([a, inf], rank=2)
