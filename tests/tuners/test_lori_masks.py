"""LoRI continual-learning masks: exclusion of an earlier mask against a brute-force oracle, and a
clear refusal (never a silent overlap) when more entries are asked for than remain free."""

from __future__ import annotations

import pytest
import torch

from adapterlab.tuners.lori.functional import kept_count, magnitude_masks


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(8, 4, generator=g),
        "v": torch.randn(6, 4, generator=g),
        "down": torch.randn(10, 2, generator=g),
    }


def _top_of_each_matrix(weights: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Exclude the ``count`` largest |B| of every matrix: a mask ignoring the exclusion would pick them."""
    out = {}
    for name, w in weights.items():
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[w.abs().flatten().argsort(descending=True)[:count]] = True
        out[name] = flat.view(w.shape)
    return out


def _brute_force(weights, exclude, k, names=None):
    """The k free entries of largest |B| (distinct continuous values: no ties), by a Python sort."""
    names = list(weights) if names is None else names
    free = [
        (abs(float(w.flatten()[i])), name, i)
        for name in names
        for w in (weights[name],)
        for i in range(w.numel())
        if not bool(exclude[name].flatten()[i])
    ]
    return {(name, i) for _, name, i in sorted(free, reverse=True)[:k]}


def _chosen(masks):
    return {(name, int(i)) for name, m in masks.items() for i in m.flatten().nonzero().flatten()}


@pytest.mark.parametrize("sparsity", [0.75, 0.9, 0.6])
def test_global_exclusion_picks_the_top_free_entries(sparsity: float) -> None:
    weights = _weights()
    exclude = _top_of_each_matrix(weights, 5)  # 15 of 76 excluded: 61 free, more than any k below
    total = sum(w.numel() for w in weights.values())
    k = kept_count(total, sparsity)
    free = total - sum(int(e.sum()) for e in exclude.values())
    assert k < free  # the exclusion can be told apart from an accidental one
    masks = magnitude_masks(weights, sparsity, exclude=exclude)
    assert sum(int(m.sum()) for m in masks.values()) == k
    assert not any((masks[n] & exclude[n]).any() for n in weights)  # never an excluded entry
    assert _chosen(masks) == _brute_force(weights, exclude, k)
    plain = magnitude_masks(weights, sparsity)
    assert any((plain[n] & exclude[n]).any() for n in weights)  # without the exclusion the top entries are taken


def test_matrix_scope_exclusion_picks_the_top_free_entries_of_each_matrix() -> None:
    weights = _weights(1)
    exclude = _top_of_each_matrix(weights, 3)
    masks = magnitude_masks(weights, 0.75, scope="matrix", exclude=exclude)
    for name, w in weights.items():
        k = kept_count(w.numel(), 0.75)
        assert int(masks[name].sum()) == k < w.numel() - 3
        assert _chosen({name: masks[name]}) == _brute_force(weights, exclude, k, names=[name])


def test_exactly_as_many_free_as_asked_is_the_complement() -> None:
    weights = _weights(2)
    exclude = magnitude_masks(weights, 0.5)  # 38 of 76 used
    masks = magnitude_masks(weights, 0.5, exclude=exclude)
    for name in weights:
        assert torch.equal(masks[name], ~exclude[name])


def test_asking_for_more_than_the_free_entries_is_refused_global() -> None:
    weights = _weights(3)
    exclude = magnitude_masks(weights, 0.5)  # 38 used, 38 free of 76
    with pytest.raises(ValueError, match=r"asked for k=45 .* only 38 of the 76 .*free") as err:
        magnitude_masks(weights, 0.4, exclude=exclude)  # k = floor(0.6 * 76) = 45
    assert "\n" not in str(err.value) and "'q'" in str(err.value) and "sparsity >= 0.5" in str(err.value)


def test_asking_for_more_than_the_free_entries_is_refused_per_matrix() -> None:
    weights = _weights(4)
    exclude = {n: torch.zeros(w.shape, dtype=torch.bool) for n, w in weights.items()}
    exclude["v"][:5] = True  # 20 of v's 24 entries used, 4 free
    with pytest.raises(ValueError, match=r"'v'.*asked for k=12 .* only 4 of the 24 .*free"):
        magnitude_masks(weights, 0.5, scope="matrix", exclude=exclude)


def test_exclusion_masks_must_match_the_matrices() -> None:
    weights = _weights(5)
    with pytest.raises(ValueError, match=r"exclude\['q'\] has shape \(4, 8\), expected \(8, 4\)"):
        magnitude_masks(weights, 0.9, exclude={"q": torch.zeros(4, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"exclude has masks for unknown matrices \['nope'\]"):
        magnitude_masks(weights, 0.9, exclude={"nope": torch.zeros(8, 4, dtype=torch.bool)})


def test_model_extract_masks_refuses_an_overlap_naming_a_module() -> None:
    from peft import get_peft_model

    from adapterlab.models import tiny_llama
    from adapterlab.tuners.lori import LoriConfig
    from tests.tuners.matrix import TARGETS

    pm = get_peft_model(tiny_llama(), LoriConfig(r=4, task="t1", sparsity=0.5, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lori_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    first = pm.extract_masks(0.5)
    second = pm.extract_masks(0.75, exclude=first)
    assert not any((second[k] & first[k]).any() for k in first)
    with pytest.raises(
        ValueError,
        match=r"6 B matrices \('model\.layers\.0\.self_attn\.q_proj', \.\.\.\): asked for k=896 .* only 640 of the 1280 .*free",
    ):
        pm.extract_masks(0.3, exclude=first)
