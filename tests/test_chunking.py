"""The one chunking / compile-mode policy (dynamics.chunking), with stated numbers."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dynamics import chunking as ch


def test_empirical_bytes_per_config_factored_and_vmap_stated_numbers():
    # factored, N = n_eval = 1024, d = 64, K = 1, V = 2, one root, 2 records, float32:
    # 2048 pairs × (12 + 2·1·(1 + 2·2)) = 2048 × 22 = 45056; distribution 2·(64 + 4096) = 8320;
    # head 4·64 = 256; records 2 × (2·12 + 2 + 64) = 180 → 53812 numbers = 215248 bytes
    assert ch.empirical_bytes_per_config(n=1024, n_eval=1024, d=64) == 4 * 53812 == 215_248
    # independent draws add d numbers per pair: 2048 × 64 = 131072 more
    assert ch.empirical_bytes_per_config(n=1024, n_eval=1024, d=64, independent=True) == 4 * (53812 + 131072)
    # vmap of the core: 2048 × 64 × (2 + 4) + 1024 × 64 + 180 = 786432 + 65536 + 180 numbers
    assert ch.empirical_bytes_per_config(n=1024, n_eval=1024, d=64, implementation="vmap") == 4 * 852_148
    with pytest.raises(ValueError, match="implementation"):
        ch.empirical_bytes_per_config(n=1, n_eval=1, d=1, implementation="loop")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        ch.empirical_bytes_per_config(n=0, n_eval=1, d=1)


def test_population_bytes_per_config_stated_number():
    # J = 2 isotropic components in d = 8: 2·(8 + 8)·4 = 128; quadrature 1344·2·8 = 21504;
    # 11 records × (8 + 6 + 3) = 187 → 21819 numbers
    assert ch.population_bytes_per_config(d=8, num_components=2, records=11) == 4 * 21_819
    # full covariances: roots of d² = 64 numbers: 2·(8 + 64)·4 = 576 instead of 128
    assert ch.population_bytes_per_config(d=8, num_components=2, records=11, full_cov=True) == 4 * (21_819 + 448)


def test_configs_per_chunk_budget_memory_cap_and_multiple():
    per = ch.empirical_bytes_per_config(n=1024, n_eval=1024, d=64)  # 215248
    # the default 256 MiB budget: 268435456 // 215248 = 1247
    assert ch.configs_per_chunk(10_000, per) == 1247
    assert ch.configs_per_chunk(100, per) == 100  # never more than the configurations
    assert ch.configs_per_chunk(10_000, per, cap=512) == 512
    # a memory bound: half of 1 GB = 5e8 bytes → 2322 configurations
    assert ch.configs_per_chunk(10_000, per, memory=10**9) == 2322
    assert ch.configs_per_chunk(10_000, per, budget=3 * per + 1) == 3
    # 4 devices: rounded down to a multiple of 4 (1244), and up to 4 when fewer fit
    assert ch.configs_per_chunk(10_000, per, multiple=4) == 1244
    assert ch.configs_per_chunk(10_000, per, budget=per, multiple=4) == 4
    assert ch.configs_per_chunk(10_000, 10**12) == 1  # one configuration always runs
    with pytest.raises(ValueError, match="bytes_per_config"):
        ch.configs_per_chunk(10, 0)


def test_balanced_chunk_evens_out_and_rounds_to_devices():
    assert ch.balanced_chunk(4096, 1456) == 1366  # 3 chunks: 1366 + 1366 + 1364
    assert ch.balanced_chunk(4096, 4096) == 4096
    assert ch.balanced_chunk(10, 3) == 3  # 4 chunks of ceil(10 / 4) = 3
    assert ch.balanced_chunk(10, 4) == 4  # 3 chunks of ceil(10 / 3) = 4
    assert ch.balanced_chunk(9, 4, multiple=4) == 4  # 3 chunks of 3, rounded up to 4 devices


def test_compile_mode_threshold_and_options():
    assert ch.compile_mode(1e9) == "fast"
    assert ch.compile_mode(ch.FAST_WORK_LIMIT) == "optimized"  # below the limit only
    assert ch.compile_mode(1e11) == "optimized"
    assert ch.compile_mode(1e15, "fast") == "fast" and ch.compile_mode(0.0, "optimized") == "optimized"
    assert ch.compile_mode(5.0, limit=10.0) == "fast" and ch.compile_mode(50.0, limit=10.0) == "optimized"
    assert ch.compiler_options("fast") == {"xla_backend_optimization_level": 0,
                                           "xla_llvm_disable_expensive_passes": True}
    assert ch.compiler_options("optimized") is None
    with pytest.raises(ValueError, match="choose one of"):
        ch.compile_mode(1.0, "quick")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        ch.compiler_options("auto")


def test_engine_auto_chunk_is_the_policy():
    """dynamics.batched.auto_chunk_size is the policy's count (its own formula would differ)."""
    from dynamics.batched import auto_chunk_size

    per = ch.empirical_bytes_per_config(n=1024, n_eval=1024, d=64)
    assert auto_chunk_size(10_000, n=1024, n_eval=1024, d=64) == ch.configs_per_chunk(10_000, per, cap=4096) == 1247


def test_chunking_imports_no_jax():
    code = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('c', "
            f"{ch.__file__!r}); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
