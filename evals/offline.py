"""The offline metrics ``vqscale demo`` ends with: quality numbers that need no downloaded weights.

- generation: class-conditional samples of the demo prior scored by the digits judge
  (:mod:`evals.digits`): the fraction classified as the digit they were asked for (chance: 10%)
  and a Fréchet distance in the judge's feature space against real held-out digits;
- reconstruction: PSNR, SSIM and codebook health of the demo tokenizer on the held-out split
  (LPIPS and rFID only where their weights are in the cache);
- linear probe: top-1 of a linear classifier on each block of the prior (the VIM protocol) next
  to the raw-pixel baseline.

Each writes its JSON, plots and TensorBoard events under the evaluated stage's ``evals/``
(``RUN/prior/evals/``, ``RUN/tokenizer/evals/``); the headline numbers are returned for the demo
summary. The demo module (pretrain) does not import evals; the ``vqscale`` command calls
this after the demo.
"""

from __future__ import annotations

from typing import Any

from data_pipeline import storage

from .generation import evaluate_generation
from .probe import evaluate_linear_probe
from .reconstruction import evaluate_reconstruction


def demo_metrics(result: dict[str, Any], guidance: float, temperature: float, seed: int = 0,
                 samples_per_digit: int = 10, progress: bool = False) -> dict[str, Any]:
    # Each stage's results go into its own run directory's evals/ (DESIGN.md), where its model
    # card finds them when the run is exported.
    out = {stage: storage.join(result[stage]["run_dir"], "evals") for stage in ("prior", "tokenizer")}
    files = [storage.join(out["prior"], "generation.json"), storage.join(out["tokenizer"], "reconstruction.json"),
             storage.join(out["prior"], "linear_probe.json")]
    if not (result["tokenizer"]["trained_now"] or result["prior"]["trained_now"]) and all(map(storage.exists, files)):
        # nothing was retrained: the results of the last run still describe these checkpoints
        return _headline(*(storage.read_json(f) for f in files), out)
    gen = evaluate_generation(result["prior"]["run_dir"], files[0],
                              num_samples=10 * samples_per_digit, class_labels=list(range(10)),
                              guidance=guidance, temperature=temperature, seed=seed, digits_judge=True,
                              batch_size=50, device="cpu", progress=progress)
    rec = evaluate_reconstruction(result["tokenizer"]["run_dir"], result["data"]["holdout"],
                                  files[1], features=None, device="cpu",
                                  progress=progress)
    probe = evaluate_linear_probe(result["prior"]["run_dir"], result["codes"], result["codes_holdout"],
                                  files[2], images_train=result["data"]["train"],
                                  images_test=result["data"]["holdout"], device="cpu", progress=progress,
                                  weight_decays=(1e-3,))   # one decay, not a sweep: minutes saved on a CPU
    return _headline(gen, rec, probe, out)


def _headline(gen: dict, rec: dict, probe: dict, out: dict[str, str]) -> dict[str, Any]:
    cb = rec.get("codebook") or {}
    return {
        "digits_class_accuracy": gen.get("class_accuracy"), "digits_fid": gen.get("digits_fid"),
        "holdout_psnr": rec.get("psnr"), "holdout_ssim": rec.get("ssim"),
        "codebook_usage": cb.get("usage"), "codebook_used": cb.get("used_codes"),
        "codebook_size": cb.get("codebook_size"), "codebook_perplexity": cb.get("perplexity"),
        "probe_best_layer": probe.get("best_layer"), "probe_best_top1": probe.get("best_top1"),
        "probe_pixel_baseline": (probe.get("pixel_baseline") or {}).get("top1"), "files": out,
    }
