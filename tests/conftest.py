import gc
import os

import jax
import numpy as np
import pytest

import dynamics as dd

# Every XLA:CPU executable keeps its own memory mappings until it is freed, and a test worker that
# compiles a few thousand programs reaches the kernel's per-process limit (vm.max_map_count,
# 65530 by default): LLVM then fails with "Cannot allocate memory" or the worker segfaults inside
# the compiler. Free JAX's compilation caches whenever a worker holds many mappings.
_MAPS_LIMIT = int(os.environ.get("DPO_TEST_MAPS_LIMIT", "20000"))


def _n_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_jit_caches():
    yield
    if _n_maps() > _MAPS_LIMIT:
        jax.clear_caches()
        gc.collect()


@pytest.fixture
def x64():
    """Run the test body in float64 (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def random_dist_params(rng: np.random.Generator, k: int, d: int, *, kind: str = "full", balanced: bool = False,
                       symmetric: bool = False, mu_scale: float = 1.0):
    """A random K-behaviour Gaussian preference distribution and its NumPy float64 parameters.

    ``kind``: "iso", "diag" or "full" covariances; ``balanced``: p = 1/2 and equal weights;
    ``symmetric``: μ⁻ = −μ⁺ and one covariance for both classes. Returns ``(dist, params)``.
    """
    mu_pos = rng.normal(size=(k, d)) * mu_scale
    mu_neg = -mu_pos if symmetric else rng.normal(size=(k, d)) * mu_scale
    covs = []
    for _ in range(1 if symmetric else 2):
        if kind == "iso":
            c = np.stack([rng.uniform(0.3, 1.5) ** 2 * np.eye(d) for _ in range(k)])
        elif kind == "diag":
            c = np.stack([np.diag(rng.uniform(0.2, 2.0, size=d)) for _ in range(k)])
        else:
            a = rng.normal(size=(k, d, d)) / np.sqrt(d)
            c = a @ np.swapaxes(a, -1, -2) + 0.2 * np.eye(d)
        covs.append(c)
    cov_neg = covs[0] if symmetric else covs[1]
    p = np.full(k, 0.5) if balanced else rng.uniform(0.2, 0.8, size=k)
    w = np.full(k, 1.0 / k) if balanced else rng.dirichlet(np.ones(k))
    params = dict(mu_pos=mu_pos, mu_neg=mu_neg, cov_pos=covs[0], cov_neg=cov_neg, p=p, w=w)
    return dd.GaussianPreference.create(mu_pos, mu_neg, covs[0], cov_neg, p, w), params


def random_dist(rng: np.random.Generator, k: int, d: int, *, kind: str = "full", imbalance: bool = True):
    """A random K-behaviour Gaussian preference distribution (NumPy float64 inputs, means scaled by 0.8)."""
    return random_dist_params(rng, k, d, kind=kind, balanced=not imbalance, mu_scale=0.8)[0]


@pytest.fixture
def rng():
    return np.random.default_rng(20240318)
