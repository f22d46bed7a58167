"""Truncated SVDs of frozen weights for PiSSA and MiLoRA: solvers and an on-disk cache.

A solver returns the r largest or r smallest singular triplets of W (out x in) in float64:

* ``exact``: full ``torch.linalg.svd`` (what PEFT's "pissa" and the official MiLoRA script do).
* ``gram``: eigen-decomposition of the smaller Gram matrix (W Wᵀ or Wᵀ W, one ``syrk``) in float64,
  asking LAPACK (``syevr`` via ``scipy.linalg.eigh(subset_by_index=...)``) for the r wanted eigenpairs only; the other side's
  vectors come from one product and a QR, which also gives an orthonormal basis where singular values
  vanish (rank-deficient W). Works for both ends of the spectrum.
* ``randomized``: randomised subspace iteration (Halko et al. 2011, Alg. 4.4) via ``torch.svd_lowrank``
  in float32 with oversampling; for the largest components only. Fast, but it converges like
  ``(S[r] / S[r-1])^(2·niter)``: on trained LLM weights, whose spectra are flat around r (SmolLM2:
  median ``S[r-1]/S[r]`` = 1.007), it captures ~95% of the top-r energy, not the exact subspace.
* ``auto``: ``gram``.

The cache keys a decomposition by an xxh3-128 hash of the weight bytes, its shape and dtype, the
method and r; entries carry a hash of their own content and are rebuilt, never trusted, when damaged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import LoraConfigError, TargetModuleError

__all__ = ["SOLVERS", "Components", "Solver", "decompose", "register_solver", "single_torch_thread", "solver_names", "svd_cache_dir"]


@dataclass(frozen=True)
class Components:
    """``W ≈ U diag(S) Vᵀ`` restricted to r triplets, in decreasing order of S."""

    U: Tensor  # (out, r)
    S: Tensor  # (r,)
    V: Tensor  # (in, r)


Solver = Callable[[Tensor, int, bool, int], "Components"]  # (W float64, r, largest, niter) -> Components
SOLVERS: dict[str, Solver] = {}  # the one solver registry; "auto" resolves to "gram"
_SELECTABLE: list[str] = []  # solvers a user may name in ``svd_solver``


def register_solver(name: str, *, selectable: bool = True) -> Callable[[Solver], Solver]:
    """Decorator adding a solver to the registry.

    Args:
        name: its registry name.
        selectable: users may choose it with ``LoraConfig(svd_solver=name)`` (internal solvers, such as the
            one behind PEFT's ``pissa_niter_K``, are not).

    Returns:
        The decorator (it returns the solver unchanged).
    """

    def add(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        if selectable and name not in _SELECTABLE:
            _SELECTABLE.append(name)
        return fn

    return add


def solver_names() -> tuple[str, ...]:
    """The values ``svd_solver`` accepts: ``"auto"`` and every selectable solver."""
    return ("auto", *_SELECTABLE)


@register_solver("exact")
def _exact(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # S descending
    pick = slice(0, r) if largest else slice(S.shape[0] - r, None)
    return Components(U[:, pick], S[pick], Vh[pick].T)


def _orthonormal_image(weight: np.ndarray, transpose: bool, basis: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning ``M @ basis`` (``= other-side vectors · S``), M = weight or weightᵀ.

    Where a singular value vanishes (rank-deficient W) the product is zero; that column becomes a
    vector of the null space of ``Mᵀ`` instead (a fixed random vector with ``col(M)`` projected out), so
    the result is a valid SVD basis, orthogonal to the rest. All BLAS/LAPACK calls go through SciPy,
    one thread pool: mixing pools (NumPy's, torch's) makes their idle threads spin against each other."""
    import scipy.linalg
    from scipy.linalg import blas

    image = blas.dgemm(1.0, weight.T, basis, trans_a=int(not transpose))  # (n, r); weight.T is Fortran order: no copy
    vanishing = S <= 1e-10 * max(float(blas.dnrm2(weight.ravel())), 1e-300)
    if vanishing.any():
        M = weight.T if transpose else weight
        probe = np.random.default_rng(0).standard_normal((M.shape[0], int(vanishing.sum())))
        coefficients = scipy.linalg.lstsq(M, probe, lapack_driver="gelsd", check_finite=False)[0]
        image[:, vanishing] = probe - M @ coefficients  # orthogonal to col(M)
    Q, R = scipy.linalg.qr(image, mode="economic", check_finite=False)
    signs = np.sign(np.diagonal(R))
    return Q * np.where(signs == 0, 1.0, signs)


@register_solver("gram")
def _gram(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    """Eigen-pairs of the smaller Gram matrix (``W Wᵀ`` or ``Wᵀ W``, eigenvalues ``S²``).

    The Gram matrix is one BLAS ``syrk`` (half a matrix product: only one triangle is formed) and
    LAPACK's MRRR solver (``syevr``) is asked for the r wanted eigen-pairs only."""
    import scipy.linalg
    from scipy.linalg import blas

    weight = W.numpy()  # (out, in), C order; weight.T is the same memory in Fortran order
    transposed = W.shape[0] > W.shape[1]  # then M = Wᵀ, else M = W; M is (m, n) with m <= n
    gram = blas.dsyrk(1.0, weight.T, trans=0 if transposed else 1, lower=False)  # (m, m) = M Mᵀ, upper
    m = gram.shape[0]
    wanted = [m - r, m - 1] if largest else [0, r - 1]
    eigenvalues, eigenvectors = scipy.linalg.eigh(
        gram, lower=False, subset_by_index=wanted, driver="evr", overwrite_a=True, check_finite=False,
    )  # ascending
    S = np.sqrt(np.clip(eigenvalues, 0, None))[::-1].copy()  # descending
    left = eigenvectors[:, ::-1].copy(order="F")  # (m, r): left vectors of M (a copy: positive strides even for r = 1)
    right = _orthonormal_image(weight, not transposed, left, S)  # (n, r): right vectors of M = Mᵀ left / S
    U, V = (right, left) if transposed else (left, right)
    return Components(torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(V))


@register_solver("randomized")
def _randomized(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    if not largest:
        raise LoraConfigError("the randomized solver finds the largest singular components only; use 'gram' or 'exact' for MiLoRA.")
    q = min(r + max(8, r // 2), min(W.shape)) if niter >= 0 else r  # oversampling sharpens the subspace
    U, S, V = torch.svd_lowrank(W.float(), q=q, niter=abs(niter))  # float32: its error is the iteration's, not rounding
    return Components(U[:, :r].double(), S[:r].double(), V[:, :r].double())


@register_solver("peft_niter", selectable=False)
def _peft_niter(W: Tensor, r: int, largest: bool, niter: int) -> Components:
    """PEFT's ``pissa_niter_K``: ``torch.svd_lowrank(W, q=r, niter=K)``, no oversampling."""
    U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return Components(U, S, V)


def _choose(solver: str, W: Tensor, r: int, largest: bool) -> str:
    """``auto`` is ``gram``: it meets the 1e-4 subspace bar on any spectrum; randomised iteration
    does so only where the spectrum decays fast (it misses it on flat, noise-like spectra)."""
    return "gram" if solver == "auto" else solver


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block. Between parallel ops torch's OpenMP workers spin,
    and SciPy's BLAS threads spin between calls; alternating the two (per-layer SVD init) made them
    fight over the cores: SmolLM2's MiLoRA init took 9.5 s instead of 4.5 s on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- cache -----------------------------------------------------------------------------------------
def svd_cache_dir() -> Path:
    """Default cache folder: ``$LORAKIT_CACHE/svd`` (``~/.cache/lorakit/svd``). Safe to delete."""
    from .cache import cache_dir

    return cache_dir() / "svd"


def _key(W: Tensor, method: str, r: int, largest: bool, niter: int) -> str:
    import xxhash

    data = W.detach().to("cpu").contiguous()
    digest = xxhash.xxh3_128(memoryview(data.flatten().view(torch.uint8).numpy()))
    digest.update(f"{tuple(data.shape)}|{data.dtype}|{method}|{niter}|{r}|{'largest' if largest else 'smallest'}".encode())
    return digest.hexdigest()


def _content_hash(parts: Components) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    for tensor in (parts.U, parts.S, parts.V):
        digest.update(memoryview(tensor.flatten().contiguous().view(torch.uint8).numpy()))  # flat: r = 1 has odd strides
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

    from .atomic import atomic_write

    tensors = {"U": parts.U.contiguous(), "S": parts.S.contiguous(), "V": parts.V.contiguous()}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata={"content": _content_hash(parts)}))


def _float64(W: Tensor) -> Tensor:
    """A float64 CPU copy of W, converted by NumPy (no torch kernel between the SciPy calls)."""
    W = W.detach().to("cpu")
    W = W if W.dtype in (torch.float32, torch.float64) else W.float()
    return torch.from_numpy(W.numpy().astype(np.float64))


def decompose(
    W: Tensor, r: int, largest: bool, solver: str = "auto", niter: int = 4, cache: str | os.PathLike | bool | None = True,
) -> Components:
    """The r largest (PiSSA) or smallest (MiLoRA) singular triplets of W, float64.

    Args:
        W: the weight (out, in), floating point; the solvers work on a float64 CPU copy.
        r: how many triplets, at most min(out, in).
        largest: True for the r largest singular values, False for the r smallest.
        solver: ``"auto"`` (``"gram"``) or a name in `SOLVERS`.
        niter: subspace iterations of the randomised solvers (the others ignore it); part of the cache key.
        cache: True for the default folder (`svd_cache_dir`), a folder path, or False/None for no cache.

    Returns:
        `Components` U (out, r), S (r,) in decreasing order and V (in, r), float64 on the CPU.

    Raises:
        TargetModuleError: W is not floating point.
        LoraConfigError: r exceeds min(out, in), `solver` is unknown, or ``"randomized"`` is asked for the smallest values.
    """
    if not W.dtype.is_floating_point:
        raise TargetModuleError(f"SVD initialisation needs a float weight, not {W.dtype}: initialise in float32, bfloat16 or float16.")
    if r > min(W.shape):
        raise LoraConfigError(f"rank {r} exceeds min(out, in) = {min(W.shape)} of a {tuple(W.shape)} weight.")
    method = _choose(solver, W, r, largest)
    if method not in SOLVERS:
        raise LoraConfigError(f"svd_solver={solver!r} is not a solver: use one of {list(solver_names())}.")
    folder = None if cache in (None, False) else (svd_cache_dir() if cache is True else Path(cache))
    path = folder / f"{_key(W, method, r, largest, niter)}.safetensors" if folder else None
    if path is not None and (parts := _read_entry(path, W, r)) is not None:
        return parts
    parts = SOLVERS[method](_float64(W), r, largest, niter)
    if path is not None:
        _write_entry(path, parts)
    return parts
