"""The ``perp`` pipeline step: PERP retraining of a pruned model folder, merged back keeping sparsity.

``adapterlab.perp_(model, scope=...)`` marks the PERP subset trainable (see methods/perp.md),
``adapterlab.retrain.retrain_`` trains it with the causal-LM loss on windows of a packaged
corpus's train split, ``merge_perp_`` folds MaskLoRA / ScaleLoRA / head LoRA back into plain
linears (verifying every pruned zero stays zero). The step writes the retrained model folder plus
``perp_report.json`` (held-out perplexity before and after).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from adapterlab.progress import ProgressFactory

logger = logging.getLogger(__name__)


def run_perp(body: Any, progress: ProgressFactory) -> dict[str, Any]:
    """Run one :class:`~adapterlab.recipe.schema.PerpStep`; returns ``{output, perplexity}``."""
    from adapterlab.callbacks.logger import SparsityRankLogger, base_sparsity
    from adapterlab.data import calibration_ids, eval_ids
    from adapterlab.evaluate import perplexity
    from adapterlab.models import load_model, load_tokenizer
    from adapterlab.recipe.training import ProgressBarCallback
    from adapterlab.retrain import has_perp_layers, merge_perp_, perp_, retrain_
    from adapterlab.staging import staged_dir

    t0 = time.perf_counter()
    tok = load_tokenizer(body.model)
    model = load_model(body.model)
    ids = eval_ids(tok, body.corpus)
    ppl = {"seqlen": body.seqlen, "max_windows": body.eval_windows, "progress": progress}
    before = perplexity(model, ids, **ppl)
    sparsity = base_sparsity(model)
    report = perp_(
        model, scope=body.scope, r=body.r, alpha=body.alpha, target_modules=body.target_modules, seed=body.seed
    )
    # training windows: the corpus's train split, drawn with seed + 1 (disjoint in seed from pruning's calibration)
    windows = calibration_ids(tok, n_samples=body.nsamples, seqlen=body.seqlen, seed=body.seed + 1, corpus=body.corpus)
    trained = retrain_(
        model,
        windows,
        steps=body.steps,
        lr=body.lr,
        batch_size=body.batch_size,
        grad_accum=body.grad_accum,
        seed=body.seed,
        callbacks=[SparsityRankLogger(), ProgressBarCallback(progress)],
    )
    merged = merge_perp_(model) if has_perp_layers(model) else None
    after = perplexity(model, ids, **ppl)
    kept = base_sparsity(model)
    if kept + 1e-12 < sparsity:
        raise RuntimeError(f"PERP lost base sparsity: {sparsity:.4%} before, {kept:.4%} after")
    info = {
        "model": body.model,
        "scope": body.scope,
        "corpus": body.corpus,
        "steps": trained.steps,
        "losses": trained.losses,
        "perplexity_before": before,
        "perplexity_after": after,
        "sparsity": kept,
        "seconds": time.perf_counter() - t0,
        "perp": report.to_dict() if hasattr(report, "to_dict") else None,
        "merge": merged.to_dict() if merged is not None and hasattr(merged, "to_dict") else None,
    }
    with staged_dir(body.output, body.overwrite) as stage:
        model.save_pretrained(str(stage))
        tok.save_pretrained(str(stage))
        (stage / "perp_report.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    logger.info("PERP %s: perplexity %.3f -> %.3f", body.scope, before, after)
    return {"output": body.output, "perplexity": after}
