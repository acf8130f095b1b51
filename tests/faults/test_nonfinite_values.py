"""Issue 15, class 9: NaN / Inf / extreme values never give a ``_LinAlgError`` traceback nor a
non-finite output file.

* ``extract`` (PHLoRA): a base or tuned weight holding NaN/Inf is refused as it is read, naming the
  model and the tensor; ``tuned − base`` overflowing fp32 is refused naming the tensor; finite but
  extreme magnitudes (2^±100, 3e38) are factorised (the SVD runs on the matrix scaled by a power of
  two), with an oracle.
* ``compress`` (shared basis): NaN/Inf adapters are refused naming the adapter and the tensor; a fit
  that leaves fp32's range is refused naming the module and the adapter (``compress`` and ``project``).
* ``merge``: overflowing deltas are refused naming the adapter and module; a base with NaN is refused
  for ``format: full``; the merged model is checked finite before it is written.
* Every writer: :func:`adapterlab.io.save_tensors` refuses NaN/Inf (so ``ExtractResult.save``,
  ``MergeResult.save`` and ``SharedBasisBundle.save`` cannot write one) and leaves nothing behind.

Each refusal: the exact line, exit code 2 through the CLI, nothing written.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterlab.cli.app import app
from adapterlab.io import load_tensors, save_tensors
from adapterlab.models import load_model, tiny_llama
from tests.merging._helpers import make_lora_dirs

runner = CliRunner()
PROGRESS = re.compile(r"\d+/\d+ \d+:\d\d:\d\d$")  # a rich progress bar line: "what ━━━━━━ 5/14 0:00:00"
Q = "model.layers.0.self_attn.q_proj.weight"
ST = "adapter_model.safetensors"


def cli(*args: str) -> tuple[int, str]:
    """Exit code and the one message line. A refusal found mid-run (a tensor read during the work) comes
    after the progress bar of that work, which is not a message line and is left out."""
    res = runner.invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, res.output
    return res.exit_code, lines[0]


def _model_with(folder: Path, value: float, *, fill: bool = False, base: Path | None = None) -> Path:
    """A tiny model folder whose layer-0 q_proj holds ``value`` (one entry, or every entry with ``fill``)."""
    model = tiny_llama(hidden_size=32) if base is None else load_model(str(base))
    with torch.no_grad():
        w = model.get_submodule(Q.removesuffix(".weight")).weight
        if fill:
            w.fill_(value)
        else:
            w[0, 0] = value
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nonfinite") / "base"
    tiny_llama(hidden_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("nonfinite-in"), 2, r=2, hidden_size=32)


def _adapter_with(src: Path, dst: Path, value: float, *, factors: str = "B") -> Path:
    """A copy of ``src`` whose ``factors`` ("B", or "AB") of every module are filled with ``value``."""
    shutil.copytree(src, dst)
    tensors = load_tensors(dst / ST)
    for k, t in tensors.items():
        if any(f"lora_{f}." in k for f in factors):
            t.fill_(value)
    save_tensors(dst / ST, tensors, allow_nonfinite=True)  # a bad input on purpose
    return dst


def _empty(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


# ---- extract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["base", "tuned"])
@pytest.mark.parametrize(
    "rule", [["--rank", "2"], ["--energy", "0.9"], ["--energy", "0.9", "--energy-scope", "global"]]
)
def test_extract_refuses_non_finite_weights(
    base: Path, tmp_path: Path, value: float, which: str, rule: list[str]
) -> None:
    from adapterlab.extraction import extract_lora

    bad = _model_with(tmp_path / which, value)
    other = _model_with(tmp_path / "other", 0.5)  # a changed q_proj, so the tensor is a LoRA target
    b, t = (bad, other) if which == "base" else (base, bad)
    line = f"{which} {str(bad)!r}: tensor {Q!r} holds NaN or Inf; nothing was extracted or written"
    kwargs = {"rank": 2} if rule[0] == "--rank" else {"energy": 0.9}
    if "global" in rule:
        kwargs["energy_scope"] = "global"
    with pytest.raises(ValueError) as err:
        extract_lora(b, t, **kwargs)
    assert str(err.value) == line
    (tmp_path / "out").mkdir()
    code, out = cli("extract", "--base", str(b), "--tuned", str(t), *rule, "-o", str(tmp_path / "out" / "lora"))
    assert (code, out) == (2, f"error: {line}")
    assert _empty(tmp_path / "out")


def test_extract_refuses_an_in_memory_model_with_nan(tmp_path: Path) -> None:
    from adapterlab.extraction import extract_lora

    b, t = tiny_llama(hidden_size=32), tiny_llama(hidden_size=32)
    with torch.no_grad():
        t.get_submodule(Q.removesuffix(".weight")).weight[1, 2] = float("nan")
    with pytest.raises(ValueError) as err:
        extract_lora(b, t, rank=2)
    assert str(err.value) == f"tuned: tensor {Q!r} holds NaN or Inf; nothing was extracted or written"


def test_extract_refuses_a_difference_that_overflows_fp32(base: Path, tmp_path: Path) -> None:
    from adapterlab.extraction import extract_lora

    b = _model_with(tmp_path / "b", -3e38, fill=True, base=base)
    t = _model_with(tmp_path / "t", 3e38, fill=True, base=base)
    line = (
        f"tuned {str(t)!r}: tensor {Q!r}: tuned − base holds NaN or Inf (an fp32 overflow: the weights are too "
        f"large to subtract); nothing was extracted or written"
    )
    with pytest.raises(ValueError) as err:
        extract_lora(b, t, rank=2)
    assert str(err.value) == line
    (tmp_path / "out").mkdir()
    code, out = cli("extract", "--base", str(b), "--tuned", str(t), "--rank", "2", "-o", str(tmp_path / "out" / "x"))
    assert (code, out) == (2, f"error: {line}")
    assert _empty(tmp_path / "out")


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("exponent", [100, -100, 126])
def test_extreme_but_finite_deltas_are_factorised(solver: str, exponent: int) -> None:
    """Oracle: a rank-2 delta ``2^e · (u1 v1ᵀ + ½ u2 v2ᵀ)`` with orthonormal u, v has σ = (2^e, 2^(e-1))
    exactly; the gram solver squared it out of fp32's range before (NaN, LinAlgError or zero)."""
    from adapterlab.extraction.functional import low_rank_factors, singular_values

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 2, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 2, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0, 0.5], dtype=torch.float64) * 2.0**exponent
    delta = (u * s) @ v.T  # [24, 40] float64
    d32 = delta.to(torch.float32)
    assert bool(torch.isfinite(d32).all()) and float(d32.abs().max()) > 0
    lr = low_rank_factors(d32, rank=2, solver=solver)
    assert bool(torch.isfinite(lr.B).all()) and bool(torch.isfinite(lr.A).all())
    rel = float(((lr.B.double() @ lr.A.double()) - d32.double()).norm() / d32.double().norm())
    assert rel < 1e-5, rel
    torch.testing.assert_close(lr.spectrum[:2].double(), s, rtol=1e-5, atol=0.0)
    assert lr.energy == pytest.approx(1.0, abs=1e-6)
    by_energy = low_rank_factors(d32, energy=0.7, solver=solver)  # σ² shares: 0.8, 0.2
    assert by_energy.rank == 1
    torch.testing.assert_close(singular_values(d32, solver)[:2].double(), s, rtol=1e-5, atol=0.0)


def test_extract_of_a_huge_finite_delta_writes_finite_factors(base: Path, tmp_path: Path) -> None:
    from adapterlab.extraction import extract_lora

    t = _model_with(tmp_path / "t", 3e38, fill=True, base=base)  # σ = 32 · 3e38 does not fit fp32
    res = extract_lora(base, t, rank=2, solver="gram")
    B, A = res.factors[Q.removesuffix(".weight")]
    assert bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())
    want = load_model(str(t)).get_submodule(Q.removesuffix(".weight")).weight.double()
    want = want - load_model(str(base)).get_submodule(Q.removesuffix(".weight")).weight.double()
    assert float(((B.double() @ A.double()) - want).norm() / want.norm()) < 1e-5
    res.save(tmp_path / "out")
    assert all(bool(torch.isfinite(v).all()) for v in load_tensors(tmp_path / "out" / ST).values())


# ---- compress ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_compress_refuses_a_non_finite_adapter(adapters: list[Path], tmp_path: Path, value: float) -> None:
    from adapterlab.compression import compress_adapters

    bad = _adapter_with(adapters[1], tmp_path / "bad", value)
    key = sorted(k for k in load_tensors(bad / ST) if "lora_B" in k)[0]
    line = f"adapters[1] 'bad': tensor {key!r} holds NaN or Inf; nothing was merged or written"
    with pytest.raises(ValueError) as err:
        compress_adapters([adapters[0], bad], rank=2)
    assert str(err.value) == line
    bundle = compress_adapters([adapters[0]], rank=2)
    with pytest.raises(ValueError) as err:
        bundle.project(bad)
    assert str(err.value) == line.replace("adapters[1]", "adapter")
    assert bundle.names == ["task0"]
    (tmp_path / "out").mkdir()
    code, out = cli("compress", str(adapters[0]), str(bad), "--rank", "2", "-o", str(tmp_path / "out" / "b"))
    assert (code, out) == (2, f"error: {line}")
    assert _empty(tmp_path / "out")


OVERFLOW = (
    r"module 'model\.layers\.0\.mlp\.down_proj': the (fit failed \(.+\)|(fitted|projected) \w+ hold NaN or Inf|"
    r"cluster costs hold NaN or Inf): the adapters' factors are too large for an fp32 fit \(adapter 'huge' has "
    r"\|B\| up to [0-9.e+]+ and \|A\| up to [0-9.e+]+\); rescale or leave it out; nothing was written"
)


@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_compress_refuses_a_fit_that_overflows(adapters: list[Path], tmp_path: Path, mode: str) -> None:
    from adapterlab.compression import compress_adapters

    huge = _adapter_with(adapters[1], tmp_path / "huge", 1e30, factors="AB")
    with pytest.raises(ValueError) as err:
        compress_adapters([adapters[0], huge], rank=2, mode=mode)
    assert re.fullmatch(OVERFLOW, str(err.value)), str(err.value)
    (tmp_path / "out").mkdir()
    code, out = cli(
        "compress", str(adapters[0]), str(huge), "--rank", "2", "-m", mode, "-o", str(tmp_path / "out" / "b")
    )
    assert code == 2 and re.fullmatch(rf"error: {OVERFLOW}", out), out
    assert _empty(tmp_path / "out")
    bundle = compress_adapters([adapters[0]], rank=2, mode=mode)
    with pytest.raises(ValueError) as err:
        bundle.project(huge)
    assert re.fullmatch(OVERFLOW, str(err.value)), str(err.value)
    assert bundle.names == ["task0"] and len(bundle.raw_params) == 1


def test_compress_refuses_a_scale_that_overflows(adapters: list[Path], tmp_path: Path) -> None:
    from adapterlab.compression import compress_adapters

    huge = _adapter_with(adapters[1], tmp_path / "huge", 3e38)  # s · B with s = alpha / r > 1
    with pytest.raises(ValueError) as err:
        compress_adapters([adapters[0], huge], rank=2)
    assert str(err.value) == (
        "adapter 'huge': module 'model.layers.0.mlp.down_proj': s · B holds NaN or Inf (an fp32 overflow: the "
        "adapter's values are too large); nothing was written"
    )


# ---- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear"])
def test_merge_refuses_a_delta_that_overflows(adapters: list[Path], tmp_path: Path, method: str) -> None:
    from adapterlab.merging import merge_adapters

    huge = _adapter_with(adapters[1], tmp_path / "huge", 1e30, factors="AB")
    line = (
        "adapter 'huge': module 'model.layers.0.mlp.down_proj': delta s · B @ A holds NaN or Inf (an fp32 "
        "overflow: the adapter's values are too large); nothing was written"
    )
    params = {"density": 0.5} if method != "linear" else {}
    with pytest.raises(ValueError) as err:
        merge_adapters([adapters[0], huge], method, **params)
    assert str(err.value) == line
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: {method}\nparams: {params}\nadapters: [{adapters[0]}, {huge}]\n")
    (tmp_path / "out").mkdir()
    code, out = cli("merge", str(cfg), "-o", str(tmp_path / "out" / "m"))
    assert (code, out) == (2, f"error: {line}")
    assert _empty(tmp_path / "out")


def test_merge_refuses_a_merged_sum_that_overflows(adapters: list[Path], tmp_path: Path) -> None:
    from adapterlab.merging import merge_adapters

    # each delta is finite (|ΔW| = s · r · 1e34 < 1e36) but task arithmetic with λ = 1e30 overflows
    a = _adapter_with(adapters[0], tmp_path / "a", 1e17, factors="AB")
    b = _adapter_with(adapters[1], tmp_path / "b", 1e17, factors="AB")
    with pytest.raises(ValueError) as err:
        merge_adapters([a, b], "task_arithmetic", lambda_=1e30)
    assert str(err.value) == (
        "module 'model.layers.0.mlp.down_proj': the merged delta holds NaN or Inf (an fp32 overflow: the adapters' "
        "values are too large to merge); nothing was merged or written"
    )


def test_a_full_merge_refuses_a_base_with_nan(adapters: list[Path], base: Path, tmp_path: Path) -> None:
    from adapterlab.merging import merge_adapters

    bad = _model_with(tmp_path / "nanbase", float("nan"), base=base)
    line = f"base {str(bad)!r}: tensor {Q!r} holds NaN or Inf; nothing was merged or written"
    with pytest.raises(ValueError) as err:
        merge_adapters(adapters, "linear", output="full", base=str(bad))
    assert str(err.value) == line
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: linear\nbase: {bad}\noutput: {{format: full}}\nadapters: [{adapters[0]}, {adapters[1]}]\n")
    (tmp_path / "out").mkdir()
    code, out = cli("merge", str(cfg), "-o", str(tmp_path / "out" / "m"))
    assert (code, out) == (2, f"error: {line}")
    assert _empty(tmp_path / "out")


# ---- every writer checks its output ------------------------------------------------------------


def test_save_tensors_refuses_nan_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        save_tensors(tmp_path / "x.safetensors", {"ok": torch.ones(2), "w": torch.tensor([1.0, float("inf")])})
    assert str(err.value) == (
        "refusing to write 'x.safetensors': tensor 'w' holds NaN or Inf (an fp32 overflow, or NaN/Inf in the "
        "inputs); nothing was written"
    )
    assert list(tmp_path.iterdir()) == []
    save_tensors(tmp_path / "x.safetensors", {"w": torch.tensor([float("nan")])}, allow_nonfinite=True)
    assert torch.isnan(load_tensors(tmp_path / "x.safetensors")["w"]).all()


def test_result_writers_refuse_non_finite_outputs(adapters: list[Path], base: Path, tmp_path: Path) -> None:
    from adapterlab.compression import compress_adapters
    from adapterlab.extraction import extract_lora
    from adapterlab.merging import merge_adapters

    tuned = _model_with(tmp_path / "tuned", 0.5, base=base)
    ex = extract_lora(base, tuned, rank=2)
    name = next(iter(ex.factors))
    ex.factors[name][0][0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"^refusing to write 'adapter_model\.safetensors': tensor '\S+lora_B\.weight' holds NaN or Inf",
    ):
        ex.save(tmp_path / "ex")
    merged = merge_adapters(adapters, "linear")
    next(iter(merged.factors.values()))[1][0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"^refusing to write 'adapter_model\.safetensors': tensor '\S+lora_A\.weight'"
    ):
        merged.save(tmp_path / "merged")
    full = merge_adapters(adapters, "linear", output="full", base=str(base))
    full.model.get_submodule(Q.removesuffix(".weight")).weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError) as err:
        full.save(tmp_path / "full")
    assert str(err.value) == (
        f"refusing to write the merged model: tensor {Q!r} holds NaN or Inf (NaN/Inf in the base, or an fp32 "
        f"overflow of base + delta); nothing was written"
    )
    bundle = compress_adapters(adapters, rank=2)
    mod = bundle.module_names[0]
    bundle.cores[mod][0].view(-1)[0] = float("nan")
    with pytest.raises(ValueError) as err:
        bundle.save(tmp_path / "bundle")
    assert str(err.value) == (
        f"refusing to write 'sigmas.safetensors': tensor {mod + '.sigma'!r} holds NaN or Inf (an fp32 overflow, or "
        f"NaN/Inf in the inputs); nothing was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]  # no output folder, no stage left
