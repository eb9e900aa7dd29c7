"""Many configurations at GEMM speed: batched empirical and population engines.

A sweep trains thousands of last-layer heads that differ only in their
parameters (distribution, β, η, ε). :func:`dynamics.empirical_trajectory`
under ``jax.vmap`` gives each configuration its own ``(n, d)`` data array, so
a step reads ``C·n·d`` numbers to do ``4·C·n·d`` FLOPs: memory bound.

This module keeps the data in factored form. Configuration ``c`` draws its
pairs as in :meth:`GaussianPreference.sample`::

    behaviour  k_i  ~ Categorical(ω_c)      (Gumbel noise G_i shared)
    label      s_i  = +1 if U_i < p_c[k_i]   (uniform U_i shared)
    embedding  x_i  = μ_c[j_i] + R_c[j_i] ε_i  (ε_i ~ N(0, I_d) shared)

with component ``j_i = (k_i, s_i)`` and ``R`` the symmetric square root of
the component covariance. With **common random numbers** (``draws="common"``)
every configuration uses the same PRNG key, hence the same ``G, U, ε``, and
the reward margin ``h_ic = s_ic δ_cᵀ x_ic`` of all configurations is::

    h = M[c, j_ic] + s_ic · σ_c[j_ic] · (ε Δᵀ)_ic      (isotropic Σ = σ² I)

one ``(n × d)·(d × C)`` GEMM, and the gradient ``E_n[ℓ'(h) s x]`` is the
transposed GEMM plus ``O(C·n·K)`` per-component sums: ``4 n d`` FLOPs per
configuration-step at GEMM speed. Diagonal covariances fold the root into
``Δ`` (``δ ⊙ r``, O(d) per configuration-step; one GEMM per distinct root),
full ones pay ``d²`` per configuration-step for ``R δ`` (never ``d³``: roots
are computed once).

Because the draws are derived exactly as :func:`empirical_trajectory` derives
them, ``draws="common"`` with key ``k`` reproduces
``empirical_trajectory(dist_c, k)`` for every configuration ``c`` (the
sweep's own seed convention, ``sims.sweep.seed_key``, already gives every
configuration of a seed the same key), and ``draws="independent"`` with
per-configuration keys ``k_c`` reproduces ``empirical_trajectory(dist_c, k_c)``
(a batched matrix-vector product per step, memory bound). Common random
numbers make differences between configurations far less noisy than
independent draws; docs/performance.md explains when to use which.

:func:`batched_population_trajectory` is the analytic (N → ∞) counterpart of
:func:`dynamics.population_trajectory` over a configuration axis; isotropic and
diagonal covariances cost ``O(K d)`` per configuration-step instead of
``O(K d²)``.

This is the ``implementation="factored"`` behind :func:`dynamics.trajectories`
(``dynamics/engine.py``), which also reaches it from traced code (``dpo-sims sweep``). Label
noise, per-behaviour loss weights, elliptical (Laplace / Student-t) draws, gradient flow and
general component sets (mixtures) are supported; the per-pair and per-component maths is
:mod:`dynamics.reduced`'s, shared with the core.

Configurations are processed in chunks (``chunk_size``), so working memory is
set by the chunk, not by ``C``; only the inputs (means, roots) and the recorded
outputs grow with ``C``.
Source: docs/theory.md §1–§3; the construction is derived in docs/performance.md.

The code lives in :mod:`dynamics.batch` (the :class:`PreferenceBatch` pytree),
:mod:`dynamics.factored_empirical`, :mod:`dynamics.factored_population` and their shared driver
``dynamics._factored_driver``; this module re-exports them (public and private names), so
``dynamics.batched`` keeps working for callers and tests.
"""
from __future__ import annotations

from . import _factored_driver, batch, factored_empirical, factored_population
from ._factored_driver import *  # noqa: F401,F403
from ._factored_driver import (_CHUNK_BUDGET, _COMPILED, _MAX_AUTO_CHUNK, _check_label_smoothing, _common_inputs,
                               _compiled, _head_arrays, _interventions, _per_config, _run_chunks)
from .batch import *  # noqa: F401,F403
from .batch import _batch_cfg, _components, _float, _typed_key
from .factored_empirical import *  # noqa: F401,F403
from .factored_empirical import (_apply_root, _apply_root_t, _draws, _empirical_kernel, _num_roots, _pick, _pick_q,
                                 _proj, _proj_t, _segment_mean, _segment_sums, _select, _select_q)
from .factored_population import *  # noqa: F401,F403
from .factored_population import _population_kernel, _population_one

__all__ = batch.__all__ + factored_empirical.__all__ + factored_population.__all__
