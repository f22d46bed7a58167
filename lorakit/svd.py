"""Truncated SVDs of frozen weights for PiSSA and MiLoRA: solvers and an on-disk cache.

A solver returns the r largest or r smallest singular triplets of W (out x in) in float64:

* ``exact``: full ``torch.linalg.svd`` (what PEFT's "pissa" and the official MiLoRA script do).
* ``gram``: eigen-decomposition of the smaller Gram matrix (W Wᵀ or Wᵀ W) in float64, asking LAPACK
  (``scipy.linalg.eigh(subset_by_index=...)``) for the r wanted eigenpairs only; the other side's
  vectors come from one product and a QR, which also gives an orthonormal basis where singular values
  vanish (rank-deficient W). Works for both ends of the spectrum.
* ``randomized``: randomised subspace iteration (Halko et al. 2011, Alg. 4.4) via ``torch.svd_lowrank``
  with oversampling; for the largest components only.
* ``auto``: ``gram``.

The cache keys a decomposition by an xxh3-128 hash of the weight bytes, its shape and dtype, the
method and r; entries carry a hash of their own content and are rebuilt, never trusted, when damaged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Components", "SOLVERS", "decompose", "svd_cache_dir"]


@dataclass(frozen=True)
class Components:
    """``W ≈ U diag(S) Vᵀ`` restricted to r triplets, in decreasing order of S."""

    U: Tensor  # (out, r)
    S: Tensor  # (r,)
    V: Tensor  # (in, r)


def _exact(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # S descending
    pick = slice(0, r) if largest else slice(S.shape[0] - r, None)
    return Components(U[:, pick], S[pick], Vh[pick].T)


def _orthonormal_image(M: Tensor, basis: Tensor, S: Tensor) -> Tensor:
    """Orthonormal columns spanning ``M @ basis`` column by column (``= other-side vectors · S``).

    Where a singular value vanishes (rank-deficient W) the product is zero; that column becomes a
    vector of the null space of ``Mᵀ`` instead (a fixed random vector with ``col(M)`` projected out), so
    the result is a valid SVD basis, orthogonal to the rest."""
    image = M @ basis  # (n, r)
    vanishing = S <= 1e-10 * max(float(torch.linalg.matrix_norm(M)), 1e-300)
    if vanishing.any():
        probe = torch.randn(M.shape[0], int(vanishing.sum()), dtype=M.dtype, generator=torch.Generator().manual_seed(0))
        coefficients = torch.linalg.lstsq(M, probe, driver="gelsd").solution
        image[:, vanishing] = probe - M @ coefficients  # orthogonal to col(M)
    Q, R = torch.linalg.qr(image)
    signs = torch.sign(torch.diagonal(R))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _gram(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    import scipy.linalg

    transposed = W.shape[0] > W.shape[1]
    M = W.T if transposed else W  # (m, n), m <= n
    m = M.shape[0]
    gram = (M @ M.T).numpy()  # (m, m), eigenvalues = S²
    wanted = [m - r, m - 1] if largest else [0, r - 1]
    eigenvalues, eigenvectors = scipy.linalg.eigh(gram, subset_by_index=wanted, driver="evr")  # ascending
    order = torch.arange(r - 1, -1, -1)  # descending
    S = torch.from_numpy(eigenvalues).clamp(min=0).sqrt()[order]
    left = torch.from_numpy(eigenvectors)[:, order]  # (m, r): left vectors of M
    right = _orthonormal_image(M.T, left, S)  # (n, r): right vectors of M
    return Components(right, S, left) if transposed else Components(left, S, right)


def _randomized(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    if not largest:
        raise ValueError("the randomized solver finds the largest singular components only; use 'gram' or 'exact' for MiLoRA.")
    q = min(r + max(8, r // 2), min(W.shape)) if niter >= 0 else r  # oversampling sharpens the subspace
    U, S, V = torch.svd_lowrank(W, q=q, niter=abs(niter))
    return Components(U[:, :r], S[:r], V[:, :r])


def _peft_niter(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    """PEFT's ``pissa_niter_K``: ``torch.svd_lowrank(W, q=r, niter=K)``, no oversampling."""
    U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return Components(U, S, V)


SOLVERS: dict[str, Callable[[Tensor, int, bool, int], Components]] = {
    "exact": _exact,
    "gram": _gram,
    "randomized": _randomized,
    "peft_niter": _peft_niter,
}
SOLVER_NAMES = ("auto", "exact", "gram", "randomized")


def _choose(solver: str, W: Tensor, r: int, largest: bool) -> str:
    """``auto`` is ``gram``: it meets the 1e-4 subspace bar on any spectrum; randomised iteration
    does so only where the spectrum decays fast (it misses it on flat, noise-like spectra)."""
    return "gram" if solver == "auto" else solver


# -- cache -----------------------------------------------------------------------------------------
def svd_cache_dir() -> Path:
    """Default cache folder: ``$LORAKIT_CACHE/svd`` (``~/.cache/lorakit/svd``). Safe to delete."""
    from .models import cache_dir

    return cache_dir() / "svd"


def _key(W: Tensor, method: str, r: int, largest: bool, niter: int) -> str:
    import xxhash

    data = W.detach().to("cpu").contiguous()
    digest = xxhash.xxh3_128(memoryview(data.view(torch.uint8).numpy()))
    digest.update(f"{tuple(data.shape)}|{data.dtype}|{method}|{niter}|{r}|{'largest' if largest else 'smallest'}".encode())
    return digest.hexdigest()


def _content_hash(parts: Components) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    for tensor in (parts.U, parts.S, parts.V):
        digest.update(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


def _read_entry(path: Path, W: Tensor, r: int) -> Components | None:
    """A cached decomposition, or None if absent or damaged in any way (then it is rebuilt)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            parts = Components(handle.get_tensor("U"), handle.get_tensor("S"), handle.get_tensor("V"))
            expected = handle.metadata().get("content")
        shapes_ok = parts.U.shape == (W.shape[0], r) and parts.S.shape == (r,) and parts.V.shape == (W.shape[1], r)
        return parts if shapes_ok and expected == _content_hash(parts) else None
    except Exception:  # truncated, not safetensors, wrong keys: ignore and rebuild
        return None


def _write_entry(path: Path, parts: Components) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {"U": parts.U.contiguous(), "S": parts.S.contiguous(), "V": parts.V.contiguous()}
    save_file(tensors, temporary, metadata={"content": _content_hash(parts)})
    os.replace(temporary, path)


def decompose(
    W: Tensor, r: int, largest: bool, solver: str = "auto", niter: int = 4, cache: str | os.PathLike | bool | None = True,
) -> Components:
    """The r largest (PiSSA) or smallest (MiLoRA) singular triplets of W, float64.

    ``cache``: True for the default folder, a path, or False/None for no cache."""
    if not W.dtype.is_floating_point:
        raise TypeError(f"SVD initialisation needs a float weight, not {W.dtype}: initialise in float32, bfloat16 or float16.")
    if r > min(W.shape):
        raise ValueError(f"rank {r} exceeds min(out, in) = {min(W.shape)} of a {tuple(W.shape)} weight.")
    method = _choose(solver, W, r, largest)
    if method not in SOLVERS:
        raise ValueError(f"svd_solver={solver!r} is not a solver: use one of {list(SOLVER_NAMES)}.")
    folder = None if cache in (None, False) else (svd_cache_dir() if cache is True else Path(cache))
    path = folder / f"{_key(W, method, r, largest, niter)}.safetensors" if folder else None
    if path is not None and (parts := _read_entry(path, W, r)) is not None:
        return parts
    parts = SOLVERS[method](W.detach().to(torch.float64), r, largest, niter)
    if path is not None:
        _write_entry(path, parts)
    return parts
