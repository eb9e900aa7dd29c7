"""Device sharding of the configuration axis (sims.distributed) on 4 forced CPU devices.

XLA flags must be set before JAX starts, so the 4-device run happens in a subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``, timeout 240 s) that writes its
results to an .npz; this process checks them. Budget: about 20 s on 2 cores.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sims.cli import UsageError
from sims.distributed import gather_shares, parse_devices, process_share, select_devices

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from dynamics.batched import PreferenceBatch, batched_empirical_trajectory
    from sims.distributed import config_mesh, shard_over_configs, sharded_executor, trajectory_arrays

    out = {}
    mesh = config_mesh("all")
    placed = shard_over_configs(lambda x: 2.0 * x, mesh)(np.arange(8.0))
    ex = sharded_executor("all")
    # 10 configurations, chunks of 6 rounded up to 8 (a multiple of 4): two chunks, the last one padded
    batch = PreferenceBatch.single(np.linspace(0.5, 2.0, 10), d=5, sigma=np.linspace(0.5, 1.5, 10),
                                   p=np.linspace(0.3, 0.7, 10))
    kw = dict(n=64, n_eval=32, beta=np.linspace(0.5, 1.5, 10), lr=0.3, steps=8, record_every=4, chunk_size=6)
    for draws in ("common", "independent"):
        for name, executor in (("single", None), ("sharded", ex)):
            t = batched_empirical_trajectory(batch, jax.random.key(1), draws=draws, executor=executor, **kw)
            out.update({f"{draws}/{name}/{k}": v for k, v in trajectory_arrays(t).items()})
    np.savez(sys.argv[1], **out)
    print(json.dumps({"devices": len(jax.devices()), "mesh": int(mesh.size), "multiple": ex.chunk_multiple,
                      "shards": len(placed.addressable_shards),
                      "placed_devices": len(placed.sharding.device_set),
                      "doubled": np.asarray(placed).tolist()}))
""")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.npz"
    env = dict(os.environ)
    # 4 host devices; backend optimisations off to compile ~2x faster (same arithmetic up to rounding)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], capture_output=True, text=True, timeout=240,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    with np.load(out) as f:
        return info, {k: f[k] for k in f.files}


def test_four_devices_were_used(sharded_run):
    info, _ = sharded_run
    assert info["devices"] == 4 and info["mesh"] == 4 and info["multiple"] == 4
    assert info["shards"] == 4 and info["placed_devices"] == 4
    assert info["doubled"] == [2.0 * i for i in range(8)]


@pytest.mark.parametrize("group", ["common", "independent"])
def test_sharded_equals_single_device(sharded_run, group):
    _, arrays = sharded_run
    names = sorted(k.split("/", 2)[2] for k in arrays if k.startswith(f"{group}/single/"))
    assert "delta" in names and "delta_final" in names
    assert any(n.endswith("/loss") for n in names)
    for name in names:
        a, b = arrays[f"{group}/single/{name}"], arrays[f"{group}/sharded/{name}"]
        assert a.shape == b.shape and a.shape[0] in (10, 3)  # 10 configurations (or the 3 recorded steps)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12, err_msg=f"{group}/{name}")
    # the configurations differ from each other (the comparison is not vacuous)
    assert np.ptp(arrays[f"{group}/single/delta_final"][:, 0]) > 1e-3


def test_process_share_partitions_the_configurations():
    for total in (0, 1, 7, 10, 101):
        for count in (1, 2, 3, 4):
            shares = [process_share(total, p, count) for p in range(count)]
            assert [i for s in shares for i in range(s.start, s.stop)] == list(range(total))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="process_id"):
        process_share(10, 2, 2)


def test_single_process_gather_is_identity():
    tree = {"a": np.arange(6.0).reshape(3, 2)}
    assert gather_shares(tree, 3) is tree


def test_device_selection_errors():
    assert parse_devices("all") == "all" and parse_devices("2") == 2
    with pytest.raises(UsageError, match="--devices"):
        parse_devices("many")
    with pytest.raises(UsageError, match="--devices"):
        parse_devices("0")
    with pytest.raises(UsageError, match="visible"):
        select_devices(10_000)
    assert len(select_devices(1)) == 1
